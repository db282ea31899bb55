"""The partitioned time-series table and the database-enforced append-only raw table."""

from django.db import migrations

HISTORY = """
CREATE TABLE telemetry_history (
    time timestamptz NOT NULL,
    device_id bigint NOT NULL,
    metric varchar(64) NOT NULL,
    value double precision NOT NULL,
    raw_id bigint NOT NULL,
    -- Serves "one device, one metric, a time range" and, scanned backwards, "latest value".
    PRIMARY KEY (device_id, metric, time)
) PARTITION BY RANGE (time);

-- Catches readings older than the oldest daily partition (late or back-filled data).
CREATE TABLE telemetry_history_default PARTITION OF telemetry_history DEFAULT;

CREATE OR REPLACE FUNCTION telemetry_history_ensure_partitions(first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    day date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        day := first_day + i;
        part := 'telemetry_history_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass(format('%I.%I', current_schema(), part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF %I.telemetry_history FOR VALUES FROM (%L) TO (%L)',
                current_schema(), part, current_schema(), day::timestamptz, (day + 1)::timestamptz
            );
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$fn$;

SELECT telemetry_history_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);
"""

HISTORY_REVERSE = """
DROP TABLE telemetry_history CASCADE;
DROP FUNCTION telemetry_history_ensure_partitions(date, integer);
"""

APPEND_ONLY = """
CREATE OR REPLACE FUNCTION telemetry_raw_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'telemetry_raw is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$fn$;

CREATE TRIGGER telemetry_raw_no_update_delete BEFORE UPDATE OR DELETE ON telemetry_raw
    FOR EACH ROW EXECUTE FUNCTION telemetry_raw_refuse_change();
CREATE TRIGGER telemetry_raw_no_truncate BEFORE TRUNCATE ON telemetry_raw
    FOR EACH STATEMENT EXECUTE FUNCTION telemetry_raw_refuse_change();
"""

APPEND_ONLY_REVERSE = """
DROP TRIGGER telemetry_raw_no_update_delete ON telemetry_raw;
DROP TRIGGER telemetry_raw_no_truncate ON telemetry_raw;
DROP FUNCTION telemetry_raw_refuse_change();
"""


class Migration(migrations.Migration):
    dependencies = [("telemetry", "0001_initial")]

    operations = [
        migrations.RunSQL(HISTORY, HISTORY_REVERSE),
        migrations.RunSQL(APPEND_ONLY, APPEND_ONLY_REVERSE),
    ]
