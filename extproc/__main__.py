"""`python -m extproc`: the `stream-relay` command (how `up` starts its children)."""

import sys

from extproc.ops.cli import main

sys.exit(main())
