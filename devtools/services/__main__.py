"""`python -m devtools.services up | down | status | run -- CMD`."""

import sys

from devtools.services.helper import main

sys.exit(main())
