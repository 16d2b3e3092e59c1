"""python -m tinysam_samples FOLDER: the real sample photos as a tiny corpus (what `make demo` masks)."""

import argparse
from pathlib import Path

from .data import write_sample_photos

parser = argparse.ArgumentParser(description="Write the real sample photos into a folder.")
parser.add_argument("folder", type=Path)
for path in write_sample_photos(parser.parse_args().folder):
    print(path)
