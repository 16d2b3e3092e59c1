"""Ray stages built on the `tinysam` library: reading images, encoding, writing Parquet.

`tinysam` knows nothing of Ray; these modules compose it into Ray Data and Ray Train pipelines,
and the scripts in `jobs/` call one function from here each.
"""
