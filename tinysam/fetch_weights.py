"""`python -m tinysam.fetch_weights NAME...`: fetch and verify known checkpoints into the cache."""

import argparse
from typing import Optional

from .weights import KNOWN_CHECKPOINTS, CheckpointError, resolve_checkpoint


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=["mobile_sam"], help=f"any of {', '.join(KNOWN_CHECKPOINTS)}")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            path = resolve_checkpoint(name)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
