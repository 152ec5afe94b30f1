import sys

from mpo_data.cli import main

if __name__ == "__main__":
    sys.exit(main())
