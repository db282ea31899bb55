"""Settings for the test suite: the real services, with cheap hashing and short timeouts."""

import os

os.environ.setdefault("ARGUS_TESTING", "1")

from argus.settings import *  # noqa: E402, F403
