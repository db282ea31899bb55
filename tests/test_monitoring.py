"""The Grafana dashboards (docker/grafana/dashboards/), their provisioning, and the read-only
PostgreSQL role they read tenants' telemetry through (docker/postgres/grafana-reader.sql).

Every PromQL expression may name only metrics the code registers; every SQL query runs, with its
variables substituted as Grafana does, against the real test database and returns the rows
expected; the role can call the dashboard's functions and nothing else."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from django.db import DatabaseError, connection, transaction
from prometheus_client import REGISTRY

from devices.models import Device
from telemetry.models import RawStatus, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = DOCKER / "grafana" / "provisioning"
READER_SQL = DOCKER / "postgres" / "grafana-reader.sql"
# The apps whose modules register metrics in the processes Prometheus scrapes.
METRIC_APPS = ["argus", "bridge", "telemetry", "assets", "devices", "dashboard"]
# Series Prometheus adds to every scrape itself.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
PROMQL_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"),
}
# What a SQL query may contain after `$`: a variable formatted as a quoted SQL string, or one of
# Grafana's macros, whose output is a quoted timestamp or a number. Anything else (`$tenant`,
# `${tenant}`, `${tenant:raw}`) would splice a user-chosen value into the SQL unquoted.
SQL_SUBSTITUTION = re.compile(r"\$\{(\w+):sqlstring\}|\$__timeFrom\(\)|\$__timeTo\(\)|\$__interval_ms\b")


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


def _datasource_type(item: dict[str, Any], panel: dict[str, Any] | None = None) -> str:
    source = item.get("datasource") or (panel or {}).get("datasource") or {}
    return str(source.get("type", ""))


def _variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


def promql_expressions() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = _load(path)
        for panel, target in _targets(dashboard):
            if _datasource_type(target, panel) == "prometheus":
                found.append((path.name, str(target["expr"])))
        for variable in _variables(dashboard):
            if _datasource_type(variable) == "prometheus":
                query = variable["query"]
                found.append((path.name, str(query["query"] if isinstance(query, dict) else query)))
    return found


def sql_queries() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = _load(path)
        for panel, target in _targets(dashboard):
            if _datasource_type(target, panel) == "grafana-postgresql-datasource":
                found.append((path.name, str(target["rawSql"])))
        for variable in _variables(dashboard):
            if _datasource_type(variable) == "grafana-postgresql-datasource":
                found.append((path.name, str(variable["query"])))
    return found


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a label_values() variable query) reads."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr)
    if label_values:
        return {label_values.group(1)}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set()
    for match in re.finditer(r"(?<![\w$.])[A-Za-z_:][\w:]*", bare):
        if bare[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def registered_series() -> set[str]:
    """Every series name the code's metrics can export, from prometheus_client's registry after
    importing each module of the apps that defines a metric."""
    for path in sorted(p for app in METRIC_APPS for p in (ROOT / app).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        text = path.read_text()
        if "prometheus_client" in text and re.search(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"", text):
            importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    suffixes = {
        "counter": ["_total", "_created"],
        "gauge": [""],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
        "stateset": [""],
        "unknown": [""],
    }
    names = set(PROMETHEUS_SERIES)
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def registered_labels() -> dict[str, set[str]]:
    """Series name -> the label names the code gives it (those Prometheus adds, job and instance,
    not included)."""
    registered_series()
    labels: dict[str, set[str]] = {}
    # A labelled metric without a child yet exports no sample: its declared label names.
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:
            declared = set(getattr(collector, "_labelnames", ()))
            labels.setdefault(name, set()).update(declared | ({"le"} if name.endswith("_bucket") else set()))
    for family in REGISTRY.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def promql_label_names(expr: str) -> tuple[list[tuple[str, str]], set[str]]:
    """The (metric, label) pairs of the expression's selectors, and the labels it groups by."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    selected = [
        (metric, label)
        for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", bare)
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers)
    ]
    grouped = {
        label.strip()
        for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", bare)
        for label in group.split(",")
        if label.strip()
    }
    return selected, grouped


# --- The dashboards' JSON and PromQL ------------------------------------------------------------


def test_it_has_the_four_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == [
        "pipeline.json",
        "processes.json",
        "tenant-telemetry.json",
        "web-and-workers.json",
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_it_parses_every_dashboard(path: Path) -> None:
    dashboard = _load(path)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"


def test_it_reads_only_metrics_the_code_registers() -> None:
    known = registered_series()
    expressions = promql_expressions()
    assert expressions
    unknown = {(name, m) for name, expr in expressions for m in promql_metric_names(expr) if m not in known}
    assert not unknown, f"metrics no module registers: {sorted(unknown)}"


def test_it_selects_and_groups_by_labels_the_metrics_have() -> None:
    labels = registered_labels()
    scrape_labels = {"job", "instance"}
    wrong = []
    for name, expr in promql_expressions():
        selected, grouped = promql_label_names(expr)
        wrong += [
            (name, f"{m}{{{label}}}") for m, label in selected if label not in labels.get(m, set()) | scrape_labels
        ]
        # A label grouped by must belong to one of the metrics the expression reads.
        of_metrics = scrape_labels.union(*(labels[m] for m in promql_metric_names(expr) if m in labels))
        wrong += [(name, f"by ({label}) in {expr}") for label in grouped if label not in of_metrics]
    assert not wrong, wrong


def test_it_matches_label_values_the_code_uses() -> None:
    """`outcome="accepted"`, `stat="publish_messages_dropped"`, `status=~"expired|failed"`: each
    value must be a string literal somewhere in the apps' code (a renamed outcome shows here)."""
    source = "\n".join(p.read_text() for app in METRIC_APPS for p in (ROOT / app).rglob("*.py"))
    literals = set(re.findall(r"[\"']([\w.-]+)[\"']", source))
    missing = []
    for name, expr in promql_expressions():
        for matchers in re.findall(r"\{([^}]*)\}", expr):
            for label, op, value in re.findall(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", matchers):
                if label in {"job", "instance"} or "$" in value:
                    continue
                values = value.split("|") if op in {"=~", "!~"} else [value]
                missing += [(name, label, v) for v in values if v not in literals]
    assert not missing, missing


def test_it_finds_the_metric_names_in_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(argus_ingest_latency_seconds_bucket{job=~"$job"}[$__rate_interval])))'
        " / on(job) group_left time() - process_start_time_seconds offset 5m"
    )
    assert promql_metric_names(expr) == {"argus_ingest_latency_seconds_bucket", "process_start_time_seconds"}
    assert promql_metric_names("label_values(process_cpu_seconds_total, job)") == {"process_cpu_seconds_total"}
    assert "argus_no_such_metric_total" not in registered_series()
    assert promql_label_names('sum by (reason, job) (rate(argus_x_total{stat="a", job=~"$job"}[5m]))') == (
        [("argus_x_total", "stat"), ("argus_x_total", "job")],
        {"reason", "job"},
    )
    labels = registered_labels()
    assert labels["argus_ingest_messages_total"] == {"outcome"}
    assert "le" in labels["argus_ingest_latency_seconds_bucket"]
    assert "generation" in labels["python_gc_collections_total"]


def test_it_shows_what_the_issue_asks_for() -> None:
    pipeline = " ".join(expr for name, expr in promql_expressions() if name == "pipeline.json")
    for metric in [
        "argus_bridge_messages_received_total",  # msgs/s in
        "argus_ingest_messages_total",  # stored
        "argus_ingest_latency_seconds_bucket",  # end-to-end latency
        "argus_ingest_pending_messages",  # consumer lag
        "argus_ingest_ack_pending_messages",  # consumer lag: delivered, not acknowledged
        "argus_ingest_redeliveries_total",  # redeliveries
        "argus_deadletters",  # dead letters
        "argus_bridge_rate_limited_total",  # rejects by reason
        "argus_broker_stat",  # broker drops
    ]:
        assert metric in pipeline, metric
    processes = " ".join(expr for name, expr in promql_expressions() if name == "processes.json")
    assert "process_cpu_seconds_total" in processes and "process_resident_memory_bytes" in processes
    # Its Job dropdown lists every scrape target, also those without process_* series (web, live
    # and worker run in multiprocess mode).
    assert "label_values(up, job)" in processes
    scraped = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert {"argus-worker", "argus-live"} <= {job["job_name"] for job in scraped}
    web = " ".join(expr for name, expr in promql_expressions() if name == "web-and-workers.json")
    for metric in [
        "argus_web_requests_total",  # requests/s by status and by route
        "argus_web_request_seconds_bucket",  # request latency
        "argus_celery_tasks_total",  # tasks/s by state
        "argus_celery_task_failures_total",  # failures by task and exception
        "argus_celery_task_seconds_bucket",  # task duration
    ]:
        assert metric in web, metric
    tenant = _load(DOCKER / "grafana" / "dashboards" / "tenant-telemetry.json")
    assert [v["name"] for v in _variables(tenant)] == ["tenant", "device", "metric"]


# --- Provisioning ------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to docker/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("."):
            mounts[target] = (DOCKER / source).resolve()
    return mounts


def _host_path(mounts: dict[str, Path], container_path: str) -> Path:
    for target, source in mounts.items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted")


def test_it_mounts_only_files_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target})"


def test_it_provisions_the_dashboards_and_their_data_sources() -> None:
    grafana = _compose()["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    mounts = _bind_mounts(grafana)
    assert _host_path(mounts, "/etc/grafana/provisioning") == PROVISIONING.resolve()

    providers = [
        provider
        for path in sorted((PROVISIONING / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert providers
    provided: set[Path] = set()
    for provider in providers:
        directory = _host_path(mounts, provider["options"]["path"])
        provided.update(p.resolve() for p in directory.glob("*.json"))
    assert provided == {p.resolve() for p in DASHBOARDS}

    sources = [
        source
        for path in sorted((PROVISIONING / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    by_uid = {source["uid"]: source for source in sources}
    for path in DASHBOARDS:
        dashboard = _load(path)
        used: list[dict[str, Any]] = [t.get("datasource") or p["datasource"] for p, t in _targets(dashboard)]
        used += [v["datasource"] for v in _variables(dashboard) if v.get("datasource")]
        for source in used:
            assert source["uid"] in by_uid, f"{path.name}: data source {source} is not provisioned"
            assert by_uid[source["uid"]]["type"] == source["type"]

    postgres = by_uid["argus-postgres"]
    # The provisioning file names the role and its password by the variables compose passes in.
    for variable in re.findall(r"\$\{(\w+)\}", json.dumps(postgres)):
        assert variable in grafana["environment"], variable
        assert variable in _compose()["services"]["db"]["environment"], variable


def test_it_creates_the_read_only_role_when_the_database_is_initialised() -> None:
    db = _compose()["services"]["db"]
    mounts = _bind_mounts(db)
    init = [target for target in mounts if target.startswith("/docker-entrypoint-initdb.d/")]
    scripts = {mounts[target].name: mounts[target] for target in init}
    assert "grafana-reader.sh" in scripts
    sql_path = re.search(r"-f (\S+)", scripts["grafana-reader.sh"].read_text())
    assert sql_path is not None
    assert _host_path(mounts, sql_path.group(1)) == READER_SQL.resolve()
    assert os.access(scripts["grafana-reader.sh"], os.X_OK)


# --- The PostgreSQL queries, as the read-only role ----------------------------------------------


def _psql(*args: str) -> None:
    settings = connection.settings_dict
    env = {
        **os.environ,
        "PGHOST": str(settings["HOST"] or "127.0.0.1"),
        "PGPORT": str(settings["PORT"] or 5432),
        "PGUSER": str(settings["USER"]),
        "PGPASSWORD": str(settings["PASSWORD"] or ""),
        "PGDATABASE": str(settings["NAME"]),
    }
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@dataclass
class Reader:
    """The role grafana-reader.sql created, under a name only this test run uses."""

    role: str
    password: str

    def connect(self) -> psycopg.Connection[Any]:
        settings = connection.settings_dict
        return psycopg.connect(
            host=settings["HOST"] or "127.0.0.1",
            port=int(settings["PORT"] or 5432),
            dbname=settings["NAME"],
            user=self.role,
            password=self.password,
            autocommit=True,
        )


@pytest.fixture(scope="module")
def reader(django_db_setup: None, django_db_blocker: Any) -> Iterator[Reader]:
    """The script run against the test database, as the compose file's db runs it; the schema and
    the role are dropped afterwards (a role belongs to the whole server)."""
    role = Reader(role=f"argus_grafana_test_{uuid.uuid4().hex[:10]}", password=uuid.uuid4().hex)
    with django_db_blocker.unblock():
        _psql("-v", f"reader={role.role}", "-v", f"password={role.password}", "-f", str(READER_SQL))
        # Twice: it is run again by hand to change the password or update the functions.
        _psql("-v", f"reader={role.role}", "-v", f"password={role.password}", "-f", str(READER_SQL))
        try:
            yield role
        finally:
            _psql("-c", "DROP SCHEMA IF EXISTS argus_grafana CASCADE", "-c", f'DROP ROLE IF EXISTS "{role.role}"')


def grafana_sql(sql: str, variables: dict[str, str], start: datetime, end: datetime, interval_ms: int) -> str:
    """The query Grafana sends: `${name:sqlstring}` quoted with '' escaping, the time macros as
    quoted UTC timestamps, $__interval_ms as a number."""

    def grafana_time(moment: datetime) -> str:
        return "'" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") + "'"

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "'" + variables[match.group(1)].replace("'", "''") + "'"
        return {
            "$__timeFrom()": grafana_time(start),
            "$__timeTo()": grafana_time(end),
            "$__interval_ms": str(interval_ms),
        }[match.group()]

    result = SQL_SUBSTITUTION.sub(substitute, sql)
    assert "$" not in result, f"unsubstituted: {result}"
    return result


def as_reader(reader: Reader, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run a query as the read-only role, inside the test's transaction (so it sees this test's
    uncommitted rows)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f'SET LOCAL ROLE "{reader.role}"')
        cursor.execute(sql)
        columns = [column.name for column in cursor.description or []]
        rows = cursor.fetchall()
        cursor.execute("RESET ROLE")
    return columns, rows


@dataclass
class Fleet:
    tenant: TenantPersona
    device: Device
    origin: datetime


@pytest.fixture
def fleet(in_alpha: TenantPersona) -> Fleet:
    """A device of alpha with readings in two 5-minute buckets and two rejected messages."""
    device = make_device(make_device_type())
    now = datetime.now(UTC)
    # A 5-minute boundary about half an hour ago: the buckets Grafana asks for start there.
    origin = datetime.fromtimestamp((now - timedelta(minutes=30)).timestamp() // 300 * 300, tz=UTC)
    rows = [
        (origin, "temperature", 1.0),
        (origin + timedelta(seconds=60), "temperature", 2.0),
        (origin + timedelta(seconds=120), "temperature", 6.0),
        (origin + timedelta(seconds=330), "temperature", 10.0),
        (origin + timedelta(seconds=30), "humidity", 40.0),
        (origin + timedelta(seconds=90), "humidity", 45.0),
    ]
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO telemetry_history (time, device_id, metric, value, raw_id) VALUES (%s, %s, %s, %s, 0)",
            [(time, device.pk, metric, value) for time, metric, value in rows],
        )
    for size in (300_000, 400_000):
        TelemetryRaw.objects.create(
            device=device,
            logical_identifier=device.logical_identifier,
            ingest_key=unique_id("key"),
            payload=b"x",
            received_at=origin + timedelta(seconds=10),
            status=RawStatus.REJECTED,
            reason=f"payload of {size} bytes exceeds 262144",
        )
    return Fleet(tenant=in_alpha, device=device, origin=origin)


def _variable_query(name: str) -> str:
    tenant = _load(DOCKER / "grafana" / "dashboards" / "tenant-telemetry.json")
    return next(str(v["query"]) for v in _variables(tenant) if v["name"] == name)


def _value_of(columns: list[str], row: tuple[Any, ...]) -> str:
    """The variable's value Grafana takes from a row: the __value column, else the first."""
    return str(row[columns.index("__value")] if "__value" in columns else row[0])


def test_it_quotes_every_variable_in_sql() -> None:
    queries = sql_queries()
    assert queries
    for name, sql in queries:
        leftover = SQL_SUBSTITUTION.sub("", sql)
        assert "$" not in leftover, f"{name}: a variable or macro Grafana would splice in unquoted: {sql}"


def test_it_answers_every_sql_query_of_the_tenant_dashboard(reader: Reader, fleet: Fleet) -> None:
    start, end = fleet.origin - timedelta(minutes=10), fleet.origin + timedelta(minutes=20)
    variables: dict[str, str] = {}

    def run(sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        return as_reader(reader, grafana_sql(sql, variables, start, end, interval_ms=300_000))

    # The variables, each from the one before, as Grafana's dropdowns fill.
    columns, rows = run(_variable_query("tenant"))
    tenants = {_value_of(columns, row): row for row in rows}
    assert "alpha" in tenants and "beta" in tenants and "public" not in tenants
    variables["tenant"] = "alpha"
    columns, rows = run(_variable_query("device"))
    assert fleet.device.logical_identifier in [_value_of(columns, row) for row in rows]
    variables["device"] = fleet.device.logical_identifier
    columns, rows = run(_variable_query("metric"))
    assert [_value_of(columns, row) for row in rows] == ["humidity", "temperature"]
    variables["metric"] = "temperature"

    results: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    tenant = _load(DOCKER / "grafana" / "dashboards" / "tenant-telemetry.json")
    for panel, target in _targets(tenant):
        results[panel["title"]] = run(str(target["rawSql"]))
    assert set(results) == {
        "$metric of $device",
        "Readings per interval",
        "Latest values of $device",
        "Rejected messages by reason",
    }
    o = fleet.origin
    assert results["$metric of $device"] == (
        ["time", "avg", "min", "max"],
        [(o, 3.0, 1.0, 6.0), (o + timedelta(minutes=5), 10.0, 10.0, 10.0)],
    )
    assert results["Readings per interval"] == (["time", "readings"], [(o, 3), (o + timedelta(minutes=5), 1)])
    assert results["Latest values of $device"] == (
        ["metric", "time", "value"],
        [("humidity", o + timedelta(seconds=90), 45.0), ("temperature", o + timedelta(seconds=330), 10.0)],
    )
    assert results["Rejected messages by reason"] == (
        ["reason", "messages", "devices", "last_at"],
        [("payload of N bytes exceeds N", 2, 1, o + timedelta(seconds=10))],
    )


@pytest.mark.parametrize(
    "tenant", ["public", "nosuchtenant", "alpha'; DROP TABLE devices; --", 'alpha"; SELECT 1; --', "alpha.devices"]
)
def test_it_refuses_a_schema_that_is_not_a_tenants(reader: Reader, fleet: Fleet, tenant: str) -> None:
    sql = grafana_sql(_variable_query("device"), {"tenant": tenant}, fleet.origin, fleet.origin, 1000)
    with pytest.raises(DatabaseError, match="no tenant with schema"):
        as_reader(reader, sql)
    assert Device.objects.filter(pk=fleet.device.pk).exists()


def test_it_passes_values_as_values(reader: Reader, fleet: Fleet) -> None:
    sql = grafana_sql(
        _variable_query("metric"), {"tenant": "alpha", "device": "x' OR '1'='1"}, fleet.origin, fleet.origin, 1000
    )
    assert as_reader(reader, sql) == (["metric"], [])


def test_it_gives_the_role_nothing_but_the_dashboards_functions(reader: Reader, alpha: TenantPersona) -> None:
    with reader.connect() as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        schemas = [row[0] for row in conn.execute("SELECT schema_name FROM argus_grafana.tenants()")]
        assert alpha.schema in schemas
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMPORARY TABLE grafana_was_here (id int)")
        # Even in a session that turns read-only off, the role may not touch a table.
        conn.execute("SET default_transaction_read_only = off")
        for statement in [
            f"SELECT count(*) FROM {alpha.schema}.devices",
            f"SELECT count(*) FROM {alpha.schema}.telemetry_history",
            f"DELETE FROM {alpha.schema}.devices",
            f"INSERT INTO {alpha.schema}.telemetry_history VALUES (now(), 1, 'x', 1, 0)",
            "SELECT count(*) FROM public.organizations",
            "SELECT password FROM public.auth_user",
            "SELECT count(*) FROM public.device_api_keys",
            "UPDATE public.organizations SET name = 'x'",
            "CREATE TABLE public.grafana_was_here (id int)",
            "CREATE TABLE argus_grafana.grafana_was_here (id int)",
            f"SELECT argus_grafana.tenant_schema('{alpha.schema}')",
            "CREATE OR REPLACE FUNCTION argus_grafana.tenants() RETURNS TABLE (schema_name text, name text)"
            " LANGUAGE sql AS $$ SELECT 'x', 'y' $$",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
