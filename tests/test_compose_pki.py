"""docker/compose.yaml's certificates: the `pki` job's script (docker/pki-init.sh) and the shipped
broker config's mutual-TLS listener and ACL, run here without Docker.

The script runs as compose runs it, with temporary directories in place of the `pki`,
`pki-public` and `pki-bridge` volumes; a private Mosquitto gets the shipped 8883 listener with
its paths pointed at those directories; runbridge connects with exactly the files compose mounts
into the bridge (its certificate and key from pki-bridge, the CA from pki-public), and a device
certificate issued afterwards publishes a message that ends up stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from django_tenants.utils import schema_context

from devices import pki
from devices.models import DeviceCertificate
from devtools.services import ServerHandle, free_port, start_mosquitto
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import Pipeline, database_url, wait_for
from tests.test_mtls_pipeline import _port_open, pki_command, publish, raw_msg_ids
from tests.test_pki_tls import TIMEOUT, _client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker" / "pki-init.sh"
MOSQUITTO_CONF = ROOT / "docker" / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "docker" / "mosquitto" / "acl"
COMPOSE = ROOT / "docker" / "compose.yaml"


@dataclass
class Volumes:
    """The three volumes the `pki` job writes, as directories."""

    pki: Path
    public: Path
    bridge: Path


def run_script(volumes: Volumes, broker_hosts: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "argus.settings_test",
            "DATABASE_URL": database_url(),
            "PKI_DIR": str(volumes.pki),
            "PKI_PUBLIC_DIR": str(volumes.public),
            "PKI_BRIDGE_DIR": str(volumes.bridge),
            "BROKER_HOSTS": broker_hosts,
            "PKI_OWNER": "",
            "PYTHON": sys.executable,
        }
    )
    return subprocess.run(
        ["sh", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def shipped_tls_listener(port: int, volumes: Volumes) -> str:
    """The shipped config's 8883 listener on 127.0.0.1:port, its paths moved to the test's directories."""
    text = MOSQUITTO_CONF.read_text()
    section = text[text.index("\nlistener 8883") + 1 :]
    rest = section.find("\nlistener ", 1)
    section = section if rest < 0 else section[:rest]
    section = section.replace("listener 8883", f"listener {port} 127.0.0.1", 1)
    for mounted, local in (
        ("/mosquitto/pki-public/", volumes.public),
        ("/mosquitto/pki/", volumes.pki),
        ("/mosquitto/config/acl", ACL),
    ):
        section = section.replace(mounted, f"{local}/" if mounted.endswith("/") else str(local))
    assert " /mosquitto/" not in section, section
    return section


@dataclass
class ComposePki:
    volumes: Volumes
    tls_port: int
    broker: ServerHandle
    pipeline: Pipeline
    schema: str
    device: str


@pytest.fixture
def compose_pki(live_db: None, alpha: TenantPersona, nats_server: ServerHandle, tmp_path: Path) -> Iterator[ComposePki]:
    volumes = Volumes(tmp_path / "pki", tmp_path / "pki-public", tmp_path / "pki-bridge")
    result = run_script(volumes, "localhost 127.0.0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    with schema_context(alpha.schema):
        device = make_device(make_device_type()).logical_identifier
    tls_port = free_port()
    with start_mosquitto(conf_extra=shipped_tls_listener(tls_port, volumes), workdir=tmp_path / "broker") as broker:
        wait_for(lambda: _port_open(tls_port), timeout=TIMEOUT, what="the mTLS listener")
        bridge_env = compose_bridge_env(volumes)
        pipeline = Pipeline(broker, nats_server, tmp_path, bridge_env, mqtt_url=f"mqtts://localhost:{tls_port}")
        try:
            pipeline.start()
            yield ComposePki(volumes, tls_port, broker, pipeline, alpha.schema, device)
        finally:
            pipeline.stop()


def compose_bridge_env(volumes: Volumes) -> dict[str, str]:
    """The compose bridge's certificate settings, with its mount points replaced by the test's directories."""
    bridge = yaml.safe_load(COMPOSE.read_text())["services"]["bridge"]
    env = bridge["environment"]
    mounts = {"/pki-bridge/": volumes.bridge, "/pki-public/": volumes.public}
    out = {}
    for name in ("ARGUS_BRIDGE_CERT", "ARGUS_BRIDGE_KEY", "ARGUS_BRIDGE_CA"):
        prefix = next(p for p in mounts if env[name].startswith(p))
        out[name] = str(mounts[prefix] / env[name].removeprefix(prefix))
    return out


def test_the_compose_bridge_reads_telemetry_on_the_mtls_listener_with_only_its_own_volumes() -> None:
    bridge = yaml.safe_load(COMPOSE.read_text())["services"]["bridge"]
    assert bridge["environment"]["MQTT_URL"] == "mqtts://mosquitto:8883"
    # Not the pki volume, which holds the CA key.
    assert sorted(bridge["volumes"]) == ["pki-bridge:/pki-bridge:ro", "pki-public:/pki-public:ro"]
    assert yaml.safe_load(COMPOSE.read_text())["services"]["pki"]["command"] == ["sh", "docker/pki-init.sh"]


def test_it_connects_the_bridge_with_what_the_pki_job_wrote_and_stores_a_devices_message(
    compose_pki: ComposePki,
) -> None:
    assert f"url=mqtts://localhost:{compose_pki.tls_port}" in compose_pki.pipeline.bridge.log()
    pki_command(compose_pki.volumes.pki, "issue-device", compose_pki.device, "--tenant", compose_pki.schema)
    with schema_context(compose_pki.schema):
        serial = DeviceCertificate.objects.get(device__logical_identifier=compose_pki.device).serial_number
    device_dir = compose_pki.volumes.pki / pki.DEVICES_DIR / compose_pki.device
    session = _client(
        compose_pki.volumes.public / pki.CA_CERT,
        device_dir / f"{serial}.crt",
        device_dir / f"{serial}.key",
        compose_pki.device,
    )
    session.client.connect("127.0.0.1", compose_pki.tls_port, keepalive=30)
    session.client.loop_start()
    try:
        assert session.connected.wait(TIMEOUT), (session.connect_rc, session.disconnect_rc)
        message = {"msg_id": "compose-1", "ts": int(time.time() * 1000), "values": {"temperature": 20.5}}
        assert publish(session, compose_pki.device, message) == 0
    finally:
        session.close()
    wait_for(lambda: raw_msg_ids(compose_pki.schema, compose_pki.device) == ["compose-1"], what="the stored message")


def test_it_keeps_the_ca_and_certificates_when_run_again(tmp_path: Path, live_db: None) -> None:
    volumes = Volumes(tmp_path / "pki", tmp_path / "pki-public", tmp_path / "pki-bridge")
    first = run_script(volumes, "mosquitto localhost")
    assert first.returncode == 0, first.stdout + first.stderr
    kept = {
        p: p.read_bytes()
        for p in (volumes.pki / "ca.crt", volumes.pki / "server.crt", volumes.bridge / "argus-bridge.crt")
    }
    again = run_script(volumes, "mosquitto localhost")
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    assert (volumes.public / "ca.crt").read_bytes() == kept[volumes.pki / "ca.crt"]
    assert (volumes.public / "crl.pem").is_file()
    assert not (volumes.public / "ca.key").exists() and not (volumes.bridge / "ca.key").exists()
