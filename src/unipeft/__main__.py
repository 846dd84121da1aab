"""`python -m unipeft ...` runs the same command line as the `unipeft` console script."""
import sys

from .cli import main

sys.exit(main())
