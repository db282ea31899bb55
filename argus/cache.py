"""Keys of Django's cache, scoped to the database they describe.

One Redis may serve several databases: two environments, a benchmark's private database beside
the machine's own, a database recreated or restored while Redis keeps its keys. Cached profiles
name rows by schema and id, which another database has too (a benchmark once judged all 90,001
of its messages by the other database's device types). So every key starts with the identity of
the database the process is connected to, and an entry is read back only by that database:

- the cluster's system identifier (another server, or one set up anew),
- the database's OID (a database dropped and created again, or restored into a new one),
- the OID of its `django_migrations` table (a restore into the same database with
  `pg_restore --clean` recreates every table).

Behind that come the tenant schema (django-tenants' key function) and Django's prefix and version.
"""

from __future__ import annotations

import hashlib

from django.db import connection

IDENTITY_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system()), d.oid, to_regclass('public.django_migrations')::oid "
    "FROM pg_database d WHERE d.datname = current_database()"
)


def database_identity() -> str:
    """A short digest naming the database this thread's connection is on (read once per connection)."""
    connection.ensure_connection()
    raw = connection.connection
    known = getattr(connection, "argus_identity", None)
    if known is None or known[0] is not raw:  # new connection: perhaps to a database made anew
        with connection.cursor() as cursor:
            cursor.execute(IDENTITY_SQL)
            row = cursor.fetchone()
        digest = hashlib.blake2b(repr(row).encode(), digest_size=8).hexdigest()
        known = (raw, digest)
        connection.argus_identity = known  # type: ignore[attr-defined]
    return str(known[1])


def make_key(key: str, key_prefix: str, version: int) -> str:
    """`<database>:<schema>:<prefix>:<version>:<key>` (the KEY_FUNCTION of CACHES)."""
    schema = getattr(connection, "schema_name", "public")
    return f"{database_identity()}:{schema}:{key_prefix}:{version}:{key}"


def reverse_key(key: str) -> str:
    """The key given to `make_key` (the REVERSE_KEY_FUNCTION of CACHES)."""
    return key.split(":", 4)[4]
