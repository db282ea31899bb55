"""What every process reads before anything else: the `.env` file and the services' default URLs.

Plain Python, no Django: the settings module and the development service helper (which runs
before settings exist) both read the environment through here, so they agree on it.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Where each service is looked for when its variable is not set.
DEFAULT_SERVICE_URLS: dict[str, str] = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/argus",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "MQTT_URL": "mqtt://127.0.0.1:1883",
    "NATS_URL": "nats://127.0.0.1:4222",
}


def read_dotenv(path: Path | None = None) -> dict[str, str]:
    """The KEY=VALUE lines of the project's `.env` (missing file: empty). Comments and blank lines
    are skipped, `export ` is allowed, and one pair of matching quotes around a value is removed."""
    values: dict[str, str] = {}
    try:
        text = (path or PROJECT_ROOT / ".env").read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values
