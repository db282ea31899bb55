"""Logs of every process: each stdlib logger's records rendered by structlog, human-readable by
default, one JSON object per line with ARGUS_LOG_FORMAT=json.

Every line carries the process (`runbridge`, `runingest`, `web`, `live`, `worker`, `beat`, or the
command) and whatever the code doing the work bound for it (`tenant`, `device`, `msg_id`:
`bound(...)`, kept in contextvars, so concurrent requests and tasks don't mix). Credentials never
reach a line: the password of any URL (`scheme://user:password@host`) is replaced by `***`,
in the message, the bound values and a traceback alike.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

FORMATS = ("console", "json")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)(?P<secret>[^\s@/]+)(?P<at>@)")


def redact(text: str) -> str:
    """The text with every URL's password replaced by ***."""
    return _URL_PASSWORD.sub(r"\g<head>***\g<at>", text)


def process_name(argv: list[str] | None = None) -> str:
    """What this process is, for every line it logs: ARGUS_PROCESS, or read off its command line."""
    named = os.environ.get("ARGUS_PROCESS")
    if named:
        return named
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else "python"
    if program in ("manage.py", "django-admin") and len(argv) > 1:
        return argv[1]
    if program == "celery" or "celery" in argv[:3]:
        return "beat" if "beat" in argv else "worker"
    if program == "gunicorn" or "gunicorn" in argv[:3]:
        return "live" if any("asgi" in a for a in argv) else "web"
    return program.removesuffix(".py")


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Add these keys (tenant, device, msg_id, …) to every line logged inside the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield


def begin(**values: Any) -> None:
    """A new unit of work (a request, a task): forget what the previous one bound, bind these.
    Left bound after it, so the lines Django writes once the response is made (`Not Found: …`)
    name the request's tenant too."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**values)


def _add_process(process: str) -> structlog.typing.Processor:
    def add(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("process", process)
        return event_dict

    return add


def _upper_level(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # `[ERROR]` in a terminal, as every Python log has looked: what operators grep for.
    event_dict["level"] = str(event_dict.get("level", method)).upper()
    return event_dict


def _redact_values(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = redact(value)
    return event_dict


def logging_config(*, fmt: str, level: str, process: str | None = None) -> dict[str, Any]:
    """The LOGGING setting: every record through structlog's formatter (dictConfig form)."""
    if fmt not in FORMATS:
        raise ValueError(f"ARGUS_LOG_FORMAT must be one of {', '.join(FORMATS)} (got {fmt!r})")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process(process or process_name()),
        structlog.stdlib.ExtraAdder(),
    ]
    # Tracebacks become text before rendering, so they are redacted too (and never carry the
    # local variables a rich traceback would print).
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=False, pad_event_to=0, exception_formatter=structlog.dev.plain_traceback
        )
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "argus": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": shared,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _redact_values,
                    *([] if fmt == "json" else [_upper_level]),
                    renderer,
                ],
            }
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "argus"}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"django.db.backends": {"level": "WARNING"}},
    }


def configure_structlog() -> None:
    """structlog's own loggers (structlog.get_logger) hand their events to the stdlib's handlers."""
    structlog.configure(
        processors=[structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
