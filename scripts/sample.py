"""Sample from a checkpoint: the same as `ms-ddpm sample` (see `python scripts/sample.py --help`)."""
import sys

from ms_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample"] + sys.argv[1:]))
