#!/bin/sh
# Run once by the postgres image's entrypoint when it initialises a new data directory
# (/docker-entrypoint-initdb.d): creates Grafana's read-only role and the functions it may call
# (docker/postgres/grafana-reader.sql, docs/monitoring.md). The migrations create the tables later;
# the functions look them up only when called.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v reader="${GRAFANA_DB_USER:-argus_grafana}" -v password="${GRAFANA_DB_PASSWORD:?set GRAFANA_DB_PASSWORD}" \
    -f /etc/argus/grafana-reader.sql
