"""`python -m sot_engine.sot ask "question"`: the same as the `sot` command (and `python -m sot_engine`)."""
import sys

from sot_engine.sot.cli import main

sys.exit(main())
