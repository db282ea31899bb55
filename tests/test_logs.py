"""Log lines (argus/logs.py): text or JSON, naming the process and the tenant, device and msg_id
they concern, never a password."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.test import Client

from argus.logs import begin, bound, logging_config, process_name, redact
from tests.conftest import TenantPersona


def capture(fmt: str, logger: str = "argus.test") -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    config = logging_config(fmt=fmt, level="INFO", process="runingest")["formatters"]["argus"]
    factory = config.pop("()")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(factory(**config))
    target = logging.getLogger(logger)
    target.addHandler(handler)
    return target, stream, handler


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    target, stream, handler = capture("json")
    begin()  # nothing bound by an earlier test's request
    yield target, stream
    target.removeHandler(handler)


def test_it_writes_one_json_object_per_line_with_its_context(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    with bound(tenant="alpha", device="D-1", msg_id="m-7"):
        log.warning("message refused key=%s", "D-1/m/m-7")
    log.info("outside")
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "message refused key=D-1/m/m-7"
    assert (first["level"], first["logger"], first["process"]) == ("warning", "argus.test", "runingest")
    assert (first["tenant"], first["device"], first["msg_id"]) == ("alpha", "D-1", "m-7")
    assert first["timestamp"].endswith("Z")
    assert "tenant" not in second  # the context ends with the block


def test_it_never_writes_a_urls_password(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    with bound(broker="mqtts://bridge:hunter2@broker:8883"):
        log.info("connecting to postgresql://argus:s3cret@db:5432/argus")
        try:
            raise ConnectionError("redis://:p4ss@cache:6379/0 refused")
        except ConnectionError:
            log.exception("failed")
    text = stream.getvalue()
    assert "hunter2" not in text and "s3cret" not in text and "p4ss" not in text
    assert "postgresql://argus:***@db:5432/argus" in text and "redis://:***@cache" in text


def test_it_writes_readable_lines_by_default() -> None:
    log, stream, handler = capture("console")
    try:
        with bound(tenant="alpha"):
            log.error("the MQTT broker dropped %d messages", 3)
    finally:
        log.removeHandler(handler)
    line = stream.getvalue()
    assert "[ERROR" in line and "the MQTT broker dropped 3 messages" in line
    assert "tenant=alpha" in line and "process=runingest" in line


def test_it_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="ARGUS_LOG_FORMAT must be one of console, json"):
        logging_config(fmt="xml", level="INFO")


@pytest.mark.parametrize(
    "argv,name",
    [
        (["manage.py", "runbridge"], "runbridge"),
        (["/app/.venv/bin/celery", "-A", "argus", "worker"], "worker"),
        (["celery", "-A", "argus", "beat"], "beat"),
        (["gunicorn", "argus.wsgi"], "web"),
        (["/x/bin/gunicorn", "argus.asgi:application", "-k", "uvicorn_worker.UvicornWorker"], "live"),
    ],
)
def test_it_names_the_process(argv: list[str], name: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("ARGUS_PROCESS", raising=False)
    assert process_name(argv) == name


def test_it_redacts_only_passwords() -> None:
    assert (
        redact("nats://user:pw@h:4222 and http://example.com/a:b@c")
        == "nats://user:***@h:4222 and http://example.com/a:b@c"
    )


def test_a_requests_lines_name_its_tenant(db: None, alpha: TenantPersona) -> None:
    log, stream, handler = capture("json", logger="django.request")
    try:
        assert Client(HTTP_HOST=alpha.host).get("/api/v1/no-such-thing/").status_code == 404
    finally:
        log.removeHandler(handler)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all(line["tenant"] == alpha.schema for line in lines), lines
