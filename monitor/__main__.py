"""`python -m monitor` runs the CLI."""

import sys

from monitor.cli import main

sys.exit(main())
