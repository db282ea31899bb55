-- The read-only PostgreSQL role of Grafana's "Argus PostgreSQL" data source (docs/monitoring.md).
--
-- Run with psql as the owner of Argus' tables (docker/postgres/grafana-reader.sh does, when the
-- compose file's pgdata volume is first initialised; run it by hand for an existing database):
--   psql -v ON_ERROR_STOP=1 -v reader=argus_grafana -v password=... -d argus -f grafana-reader.sql
-- Idempotent: run it again to change the password or update the functions.
--
-- The role may do one thing: call the functions of schema argus_grafana. It has no privilege on
-- any table, so it cannot read users, sessions, API keys or payloads, and cannot write at all
-- (its sessions are read-only besides). Tenants live in one schema each, created while the
-- platform runs, so a GRANT per schema would always be behind; instead each function is SECURITY
-- DEFINER, takes the tenant's schema name as an argument, accepts it only if
-- public.organizations lists it, and quotes it as an identifier (format('%I')) before use.
-- Values (device, metric, times) are passed as parameters (EXECUTE ... USING), never spliced.

\set ON_ERROR_STOP on

SELECT format('CREATE ROLE %I LOGIN', :'reader')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader') \gexec
ALTER ROLE :"reader" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT
    PASSWORD :'password' CONNECTION LIMIT 10;
ALTER ROLE :"reader" SET default_transaction_read_only = on;
ALTER ROLE :"reader" SET statement_timeout = '30s';

CREATE SCHEMA IF NOT EXISTS argus_grafana;
REVOKE ALL ON SCHEMA argus_grafana FROM PUBLIC;
GRANT USAGE ON SCHEMA argus_grafana TO :"reader";

-- The tenant's schema, quoted, if it is a tenant's; an error otherwise (the public schema included).
CREATE OR REPLACE FUNCTION argus_grafana.tenant_schema(tenant text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF tenant IS NULL OR tenant = 'public'
        OR NOT EXISTS (SELECT FROM public.organizations o WHERE o.schema_name = tenant) THEN
        RAISE EXCEPTION 'no tenant with schema %', quote_literal(coalesce(tenant, ''));
    END IF;
    RETURN format('%I', tenant);
END $$;

-- Variable "tenant": every tenant's schema name (value) and display name.
CREATE OR REPLACE FUNCTION argus_grafana.tenants() RETURNS TABLE (schema_name text, name text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT o.schema_name::text, o.name::text FROM public.organizations o
    WHERE o.schema_name <> 'public' ORDER BY o.name, o.schema_name
$$;

-- Variable "device": the tenant's devices by logical identifier.
CREATE OR REPLACE FUNCTION argus_grafana.devices(tenant text)
RETURNS TABLE (logical_identifier text, name text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT d.logical_identifier::text, d.name::text FROM %s.devices d ORDER BY d.logical_identifier',
        argus_grafana.tenant_schema(tenant));
END $$;

-- Variable "metric": every metric the device has readings of, one index probe per name
-- (the skip scan of telemetry/selectors.py metrics_of_device).
CREATE OR REPLACE FUNCTION argus_grafana.device_metrics(tenant text, device text) RETURNS TABLE (metric text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := argus_grafana.tenant_schema(tenant);
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH RECURSIVE dev AS (SELECT id FROM %1$s.devices WHERE logical_identifier = $1),
        names(metric) AS (
            SELECT min(h.metric) FROM %1$s.telemetry_history h, dev WHERE h.device_id = dev.id
            UNION ALL
            SELECT (SELECT min(h.metric) FROM %1$s.telemetry_history h, dev
                    WHERE h.device_id = dev.id AND h.metric > names.metric)
            FROM names WHERE names.metric IS NOT NULL
        )
        SELECT metric::text FROM names WHERE metric IS NOT NULL ORDER BY metric
    $q$, s) USING device;
END $$;

-- Panel "history": one metric of one device from start to stop, in buckets of bucket_ms (Grafana's
-- $__interval_ms, which follows the panel's width; at least a second) aligned to the epoch, so a
-- bucket keeps its value while the time range moves.
CREATE OR REPLACE FUNCTION argus_grafana.device_history(
    tenant text, device text, metric text, start timestamptz, stop timestamptz, bucket_ms bigint
) RETURNS TABLE ("time" timestamptz, avg double precision, min double precision, max double precision, readings bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := argus_grafana.tenant_schema(tenant);
BEGIN
    RETURN QUERY EXECUTE format($q$
        SELECT date_bin($5, h.time, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bucket,
               avg(h.value), min(h.value), max(h.value), count(*)
        FROM %1$s.telemetry_history h
        WHERE h.device_id = (SELECT d.id FROM %1$s.devices d WHERE d.logical_identifier = $1)
          AND h.metric = $2 AND h.time >= $3 AND h.time < $4
        GROUP BY bucket ORDER BY bucket
    $q$, s) USING device, metric, start, stop, make_interval(secs => greatest(bucket_ms, 1000) / 1000.0);
END $$;

-- Panel "latest values": the device's newest reading of each metric.
CREATE OR REPLACE FUNCTION argus_grafana.device_latest(tenant text, device text)
RETURNS TABLE (metric text, "time" timestamptz, value double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := argus_grafana.tenant_schema(tenant);
BEGIN
    RETURN QUERY EXECUTE format($q$
        SELECT m.metric, r.time, r.value
        FROM argus_grafana.device_metrics($1, $2) m
        CROSS JOIN LATERAL (
            SELECT h.time, h.value FROM %1$s.telemetry_history h
            WHERE h.device_id = (SELECT d.id FROM %1$s.devices d WHERE d.logical_identifier = $2)
              AND h.metric = m.metric
            ORDER BY h.time DESC LIMIT 1
        ) r
        ORDER BY m.metric
    $q$, s) USING tenant, device;
END $$;

-- Panel "rejects by reason": the tenant's rejected messages from start to stop, grouped by their
-- reason with the numbers taken out (so "payload of 300000 bytes exceeds ..." is one group).
-- Reads telemetry_raw through its partial index of rejected and ignored rows.
CREATE OR REPLACE FUNCTION argus_grafana.rejects(tenant text, start timestamptz, stop timestamptz)
RETURNS TABLE (reason text, messages bigint, devices bigint, last_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := argus_grafana.tenant_schema(tenant);
BEGIN
    RETURN QUERY EXECUTE format($q$
        SELECT left(regexp_replace(r.reason, '[0-9]+', 'N', 'g'), 200) AS reason,
               count(*), count(DISTINCT r.logical_identifier), max(r.received_at)
        FROM %1$s.telemetry_raw r
        WHERE r.status = 'rejected' AND r.received_at >= $1 AND r.received_at < $2
        GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50
    $q$, s) USING start, stop;
END $$;

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = 'argus_grafana'::regnamespace LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION
    argus_grafana.tenants(),
    argus_grafana.devices(text),
    argus_grafana.device_metrics(text, text),
    argus_grafana.device_history(text, text, text, timestamptz, timestamptz, bigint),
    argus_grafana.device_latest(text, text),
    argus_grafana.rejects(text, timestamptz, timestamptz)
TO :"reader";
