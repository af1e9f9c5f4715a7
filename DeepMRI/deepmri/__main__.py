"""`python -m deepmri` runs the command line."""

import sys

from deepmri.cli import main

sys.exit(main())
