"""``python -m codedsmooth`` (and ``torchrun -m codedsmooth``) runs the command line."""

import sys

from codedsmooth.cli import main

sys.exit(main())
