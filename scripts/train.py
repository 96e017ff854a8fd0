"""Train a DDPM: the same as `ms-ddpm train` (see `python scripts/train.py --help`)."""
import sys

from ms_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
