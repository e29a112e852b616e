"""``python -m engine.cli``: the ``geo-r1`` command line."""

import sys

from engine.cli import main

sys.exit(main())
