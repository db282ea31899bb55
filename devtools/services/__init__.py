"""The service helper behind `make demo` and `make test`: for each of DATABASE_URL, REDIS_URL,
MQTT_URL and NATS_URL, the server that answers there is used, or a private one is started at
exactly that address (data and logs under `.run/`) and stopped again afterwards.

One module per server describes it (`postgres`, `redis`, `mosquitto`, `nats`: a `Service` and
its `start_*` function); `base` holds what they share (the process handle, ports, readiness);
`helper` the commands (`python -m devtools.services up | down | status | run -- CMD`).
"""

from devtools.services.base import (
    DevServiceError,
    ServerHandle,
    Service,
    free_port,
    port_open,
    run_dir,
)
from devtools.services.helper import SERVICES, ServiceSpec, down, load_dotenv, main, run, service_specs, status, up
from devtools.services.mosquitto import mosquitto_config, start_mosquitto
from devtools.services.nats import NatsCluster, start_nats, start_nats_cluster
from devtools.services.postgres import ensure_database, postgres_settings, start_postgres
from devtools.services.redis import start_redis

__all__ = [
    "SERVICES",
    "DevServiceError",
    "NatsCluster",
    "ServerHandle",
    "Service",
    "ServiceSpec",
    "down",
    "ensure_database",
    "free_port",
    "load_dotenv",
    "main",
    "mosquitto_config",
    "port_open",
    "postgres_settings",
    "run",
    "run_dir",
    "service_specs",
    "start_mosquitto",
    "start_nats",
    "start_nats_cluster",
    "start_postgres",
    "start_redis",
    "status",
    "up",
]
