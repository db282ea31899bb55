"""Settings for the test suite: the real services, with cheap hashing and short timeouts."""

import os
from urllib.parse import urlparse, urlunparse

os.environ.setdefault("ARGUS_TESTING", "1")

from argus.settings import *  # noqa: F403
from argus.settings import CACHES, REDIS_URL

# Tests use their own Redis database, so cached profiles and queued tasks of a development
# instance (whose tenant `demo` has other device ids) never meet the test database's.
# ARGUS_TEST_REDIS_DB picks another, so two checkouts can run their suites side by side (with
# DATABASE_URL naming different databases).
_redis = urlparse(REDIS_URL)
TEST_REDIS_URL = urlunparse(_redis._replace(path="/" + os.environ.get("ARGUS_TEST_REDIS_DB", "15")))
CACHES["default"]["LOCATION"] = TEST_REDIS_URL
CELERY_BROKER_URL = TEST_REDIS_URL
ARGUS_INGEST_BATCH_WAIT_SECONDS = 0.02
ARGUS_INGEST_MAX_DELIVER = 3
ARGUS_INGEST_ACK_WAIT_SECONDS = 5.0
