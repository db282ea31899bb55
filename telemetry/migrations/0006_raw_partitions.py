"""telemetry_raw range-partitioned by received_at, a partition a UTC day, as telemetry_history is,
so that retention can drop whole days (docs/retention.md).

In each tenant schema the table as it was becomes one partition, `telemetry_raw_legacy`, covering
everything up to the end of today (or of its newest row's day): attached, not copied, so the
migration does not rewrite a table of hundreds of millions of rows (it builds one index on it,
the new primary key (id, received_at)). It is dropped whole once its last day is older than the
retention. An empty table (a new tenant) is dropped instead and replaced by daily partitions.

What changes for the rows' guarantees:
- append-only: the row trigger refusing UPDATE and DELETE is defined on the parent and so on
  every partition; each partition also refuses TRUNCATE (statement triggers do not propagate);
- the ingest key is unique within each day's partition, not across the table (a unique index of
  a partitioned table must include its partition key); storage.py checks the neighbouring day
  for messages received near midnight;
- no foreign key can point at telemetry_raw(id) any more: telemetry_chunks.raw_id loses its
  constraint (the ORM still protects raw rows).

Not reversible: going back would mean rewriting every partition into one table.
"""

import django.db.models.deletion
from django.db import migrations, models

ENSURE = """
CREATE OR REPLACE FUNCTION telemetry_raw_ensure_partitions(first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    day date;
    created integer := 0;
    part text;
    s text := current_schema();
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        day := first_day + i;
        part := 'telemetry_raw_p' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('%I.%I', s, part)) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF %I.telemetry_raw FOR VALUES FROM (%L) TO (%L)',
                s, part, s, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
            );
        EXCEPTION WHEN invalid_object_definition THEN
            -- The day lies inside a wider partition (telemetry_raw_legacy): it has one already.
            CONTINUE;
        END;
        PERFORM telemetry_raw_partition_guard(part);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$fn$;

-- What every partition has besides what it inherits: the ingest key unique within it, and
-- TRUNCATE refused (a statement trigger on the parent fires only for TRUNCATE of the parent).
CREATE OR REPLACE FUNCTION telemetry_raw_partition_guard(part text)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I.%I (ingest_key)', part || '_ingest_key', s, part);
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER telemetry_raw_no_truncate BEFORE TRUNCATE ON %I.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION %I.telemetry_raw_refuse_change()',
        s, part, s
    );
END
$fn$;
"""

CONVERT = """
DO $do$
DECLARE
    fk record;
    seq text := pg_get_serial_sequence('telemetry_raw', 'id');
    last_id bigint;
    newest timestamptz;
    bound date;
BEGIN
    FOR fk IN
        SELECT conname, conrelid::regclass AS tbl FROM pg_constraint
        WHERE contype = 'f' AND confrelid = 'telemetry_raw'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.tbl, fk.conname);
    END LOOP;

    -- A partitioned table cannot have an identity column (before PostgreSQL 17): the ids go on
    -- from the identity's sequence in a plain one.
    EXECUTE format('SELECT last_value FROM %s', seq) INTO last_id;
    SELECT GREATEST(last_id, max(id), 1), max(received_at) INTO last_id, newest FROM telemetry_raw;
    ALTER TABLE telemetry_raw ALTER COLUMN id DROP IDENTITY;
    CREATE SEQUENCE telemetry_raw_id_seq;
    PERFORM setval('telemetry_raw_id_seq', last_id);

    DROP TRIGGER telemetry_raw_no_update_delete ON telemetry_raw;
    ALTER TABLE telemetry_raw DROP CONSTRAINT telemetry_raw_pkey;
    ALTER TABLE telemetry_raw RENAME CONSTRAINT telemetry_raw_ingest_key_uniq TO telemetry_raw_legacy_ingest_key;
    ALTER INDEX telemetry_raw_device_recv_idx RENAME TO telemetry_raw_legacy_device_recv_idx;
    ALTER INDEX telemetry_raw_status_idx RENAME TO telemetry_raw_legacy_status_idx;
    ALTER TABLE telemetry_raw RENAME TO telemetry_raw_legacy;

    CREATE TABLE telemetry_raw (LIKE telemetry_raw_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (received_at);
    ALTER TABLE telemetry_raw ALTER COLUMN id SET DEFAULT nextval('telemetry_raw_id_seq');
    ALTER SEQUENCE telemetry_raw_id_seq OWNED BY telemetry_raw.id;
    ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_pkey PRIMARY KEY (id, received_at);
    CREATE INDEX telemetry_raw_device_recv_idx ON telemetry_raw (device_id, received_at DESC);
    CREATE INDEX telemetry_raw_status_idx ON telemetry_raw (status, received_at DESC)
        WHERE NOT (status::text = ANY (ARRAY['accepted', 'chunk']));
    CREATE TRIGGER telemetry_raw_no_update_delete BEFORE UPDATE OR DELETE ON telemetry_raw
        FOR EACH ROW EXECUTE FUNCTION telemetry_raw_refuse_change();
    CREATE TRIGGER telemetry_raw_no_truncate BEFORE TRUNCATE ON telemetry_raw
        FOR EACH STATEMENT EXECUTE FUNCTION telemetry_raw_refuse_change();

    IF newest IS NULL THEN
        DROP TABLE telemetry_raw_legacy;
        PERFORM telemetry_raw_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);
    ELSE
        bound := GREATEST((now() AT TIME ZONE 'UTC')::date, (newest AT TIME ZONE 'UTC')::date) + 1;
        EXECUTE format(
            'ALTER TABLE telemetry_raw ATTACH PARTITION telemetry_raw_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            bound::timestamp AT TIME ZONE 'UTC'
        );
        PERFORM telemetry_raw_ensure_partitions(bound, 8);
    END IF;

    -- Rows outside every daily partition (a backlog older than the retention, a clock far ahead)
    -- are stored here rather than failing their batch; retention drops it once all of it expired.
    CREATE TABLE telemetry_raw_default PARTITION OF telemetry_raw DEFAULT;
    PERFORM telemetry_raw_partition_guard('telemetry_raw_default');
END
$do$;
"""


class Migration(migrations.Migration):
    dependencies = [("telemetry", "0005_raw_status_index_without_chunks")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(ENSURE), migrations.RunSQL(CONVERT)],
            state_operations=[
                migrations.RemoveConstraint(model_name="telemetryraw", name="telemetry_raw_ingest_key_uniq"),
                migrations.AlterField(
                    model_name="telemetrychunk",
                    name="raw",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="telemetry.telemetryraw",
                    ),
                ),
            ],
        ),
    ]
