"""``python -m flows.cli``: the ``image-search`` command."""

import sys

from flows.cli import main

sys.exit(main())
