#!/bin/sh
# Run once by the postgres image's entrypoint when it initialises a new data directory
# (/docker-entrypoint-initdb.d): makes the server read our settings, docker/postgres/argus.conf.
set -eu
echo "include '/etc/argus/postgres.conf'" >> "$PGDATA/postgresql.conf"
