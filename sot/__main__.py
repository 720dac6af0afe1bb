"""`python -m sot ask "question"`: the same as the `sot` command."""
import sys

from sot.cli import main

sys.exit(main())
