"""`python -m swarmtune` runs the command line."""

import sys

from swarmtune.cli import main

sys.exit(main())
