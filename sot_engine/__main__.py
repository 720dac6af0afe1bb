"""`python -m sot_engine ask "question"`: the `sot` command (ask, compare, bench, serve, generate)."""
import sys

from sot_engine.sot.cli import main

sys.exit(main())
