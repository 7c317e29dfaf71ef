"""``python -m vlmsafe.cli`` (what ``torchrun`` and ``accelerate launch -m`` run): the ``vlmsafe`` command."""

import sys

from vlmsafe.cli import main

sys.exit(main())
