"""`python -m semantica_study`: see semantica_study.cli."""
import sys

from semantica_study import cli

sys.exit(cli.main())
