"""The tables the jobs write, one module each (schema, writer, reader):

files       atomic Parquet writes, complete-file listing, the resume skip set, provenance
errors      <output>/_errors: images that could not be processed, with the reason
embeddings  the precompute job's teacher embeddings
masks       the auto-masking job's masks (COCO RLE per image)
shards      <output>/_shards: the image ids of each tar shard read to its end (resume per shard)
"""
