"""`python -m swarmtune` runs the command line."""

from swarmtune.cli import entry

entry()
