"""`python -m nnunetv2_dram ...`: the command line where no console script is installed (e.g. pip --target)."""
import sys

from nnunetv2_dram.cli import main

sys.exit(main())
