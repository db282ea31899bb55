"""The fleet benchmark (`make fleet-bench`): FLEET_DEVICES devices, each with its own mutual-TLS
connection and certificate, publishing every FLEET_INTERVAL seconds through a private Mosquitto
(the shipped config: its plain listener for the bridge, its mTLS listener with CRL and ACL for the
devices) -> runbridge -> JetStream -> runingest -> PostgreSQL, for FLEET_SECONDS.

It measures how long the fleet took to connect, the broker's RSS and CPU, the end-to-end latency
(stored_at - the device's ts) and, with FLEET_STORM=1, a reconnect storm: the broker is restarted
(SIGTERM, it saves its persistence, and starts again on the same data) once the fleet is
connected, and the bench reports how long until every device was back and how many TLS
handshakes a second the broker completed meanwhile. The loss checker (devtools.faults.compare)
then holds every msg_id the broker acknowledged with a PUBACK against telemetry_raw: lost =
acknowledged, never stored; duplicates = stored more than once.

Devices are provisioned with the bulk provisioning service (assets.provisioning) into tenant
`bench`, their certificates issued by the project's CA (devices.services.certificate_issue) into
.run/fleet-pki, which is kept between runs: only devices without a usable certificate get one.

Environment: FLEET_DEVICES (10000), FLEET_INTERVAL (10 s), FLEET_JITTER (0.1), FLEET_SECONDS
(120: the publishing phase, from the moment every device is connected), FLEET_STORM (0; 1: restart
the broker FLEET_STORM_AFTER (30) s into that phase), FLEET_PROCESSES (simulator processes; 4),
FLEET_TRANSPORT (mqtts; mqtt: the plain listener, no certificates).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django_tenants.utils import schema_context

from assets.provisioning import devices_provision
from devices import pki
from devices.models import Device, DeviceCertificate
from devices.services import certificate_crl_publish, certificate_issue, certificate_revoke
from devtools.bench import (
    ENDPOINT_TYPE,
    SCHEMA,
    Bench,
    BenchSettings,
    Writer,
    _device_type,
    ensure_tenant,
    machine_description,
    max_raw_id,
    migrate_database,
    pipeline_pids,
    start_pipeline,
    stop_pipeline,
)
from devtools.faults import compare
from devtools.fleet import DISCONNECT, FleetConfig, FleetResult, WorkerStatus, connect_packet, publish_packet, run_fleet
from devtools.measure import DRAIN_IDLE_SECONDS, PidSource, ProcSampler, like_prefix, percentile
from devtools.services import free_port
from devtools.services.mosquitto import tls_listener_config
from devtools.simulator import TlsIdentity

ACL = Path(__file__).resolve().parent.parent / "docker" / "mosquitto" / "acl"
DEVICE_PREFIX = "FLEET-"
# Not in the fleet: a valid certificate that tries another device's topic, and a revoked one.
PROBE_DEVICE = "FLEETPROBE-ACL"
REVOKED_DEVICE = "FLEETPROBE-REVOKED"
CONNECT_WAIT = 600.0  # for the whole fleet to connect (10,000 TLS handshakes on 2 cores)
CERT_DAYS = 30


@dataclass(frozen=True)
class FleetSettings:
    devices: int
    interval: float
    jitter: float
    seconds: float
    storm: bool
    storm_after: float
    processes: int
    transport: str

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FleetSettings:
        env = dict(os.environ if environ is None else environ)
        transport = env.get("FLEET_TRANSPORT", "mqtts") or "mqtts"
        if transport not in ("mqtt", "mqtts"):
            raise ValueError("FLEET_TRANSPORT must be mqtt or mqtts")
        return cls(
            devices=int(env.get("FLEET_DEVICES", "") or 10000),
            interval=float(env.get("FLEET_INTERVAL", "") or 10),
            jitter=float(env.get("FLEET_JITTER", "") or 0.1),
            seconds=float(env.get("FLEET_SECONDS", "") or 120),
            storm=env.get("FLEET_STORM", "0").lower() in ("1", "true", "yes", "on"),
            storm_after=float(env.get("FLEET_STORM_AFTER", "") or 30),
            processes=int(env.get("FLEET_PROCESSES", "") or 4),
            transport=transport,
        )


def fleet_device_ids(count: int) -> list[str]:
    return [f"{DEVICE_PREFIX}{i:05d}" for i in range(count)]


# --------------------------------------------------------------------------- devices and certificates


def provision_fleet(ids: list[str], device_type: str, log: Callable[[str], None]) -> None:
    """The devices, in the current tenant, through the bulk provisioning service (idempotent:
    rows already there are left unchanged)."""
    existing = set(Device.objects.filter(logical_identifier__in=ids).values_list("logical_identifier", flat=True))
    rows = [
        {"logical_identifier": i, "name": f"fleet {i}", "device_type": device_type} for i in ids if i not in existing
    ]
    if not rows:
        return
    started = time.monotonic()
    report = devices_provision(rows=rows)
    if report.refused:
        first = report.refused[0]
        raise ValueError(
            f"provisioning refused {len(report.refused)} rows, first {first.logical_identifier}: {first.errors}"
        )
    log(f"provisioned {report.count('created')} devices in {time.monotonic() - started:.1f} s")


def prepare_pki(pki_dir: Path) -> None:
    """A CA and a broker certificate for 127.0.0.1 (made once), and a CRL of every revocation."""
    if not (pki_dir / pki.CA_CERT).exists():
        pki.init_ca(pki_dir)
    if not (pki_dir / pki.SERVER_CERT).exists():
        pki.issue_server(pki_dir, ["127.0.0.1", "localhost"])
    certificate_crl_publish(out_dir=pki_dir)


def device_identities(ids: list[str], pki_dir: Path, log: Callable[[str], None]) -> dict[str, TlsIdentity]:
    """Each device's certificate: one already issued (recorded, not revoked, its files in
    pki_dir), else a new one from the CA (in the current tenant)."""
    usable: dict[str, TlsIdentity] = {}
    ca = str(pki_dir / pki.CA_CERT)
    recorded = DeviceCertificate.objects.filter(
        device__logical_identifier__in=ids, revoked_at__isnull=True
    ).values_list("device__logical_identifier", "serial_number")
    for logical_id, serial in recorded:
        cert = pki_dir / pki.DEVICES_DIR / logical_id / f"{serial}.crt"
        if cert.exists() and cert.with_suffix(".key").exists():
            usable[logical_id] = TlsIdentity(str(cert), str(cert.with_suffix(".key")), ca)
    missing = [i for i in ids if i not in usable]
    if missing:
        log(f"issuing {len(missing)} device certificates (kept in {pki_dir} for the next run)")
        started = time.monotonic()
        for count, device in enumerate(Device.objects.filter(logical_identifier__in=missing).iterator(), 1):
            issued = certificate_issue(device=device, out_dir=pki_dir, days=CERT_DAYS)
            cert = pki_dir / pki.DEVICES_DIR / device.logical_identifier / f"{issued.serial_number}.crt"
            usable[device.logical_identifier] = TlsIdentity(str(cert), str(cert.with_suffix(".key")), ca)
            if count % 1000 == 0:
                log(f"  {count} issued, {count / (time.monotonic() - started):.0f}/s")
    return usable


def probe_identities(pki_dir: Path) -> dict[str, TlsIdentity]:
    """Certificates of the two probe devices (in the current tenant): PROBE_DEVICE's valid,
    REVOKED_DEVICE's revoked (issued and revoked once, then kept); publish the CRL after this."""
    identities = device_identities([PROBE_DEVICE, REVOKED_DEVICE], pki_dir, lambda text: None)
    revoked = Device.objects.get(logical_identifier=REVOKED_DEVICE)
    certificate_revoke(device=revoked, reason="fleet bench: must be refused")
    return identities


def _probe_connect(port: int, identity: TlsIdentity) -> ssl.SSLSocket:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=identity.ca)
    context.load_cert_chain(identity.cert, identity.key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(connect_packet(f"probe-{uuid.uuid4().hex[:6]}", 30, clean_session=True))
        connack = sock.recv(4)
    except BaseException:
        raw.close()
        raise
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise ConnectionError(f"no CONNACK accepting the connection: {connack!r}")
    return sock


def run_probes(port: int, probes: dict[str, TlsIdentity], other_device: str, prefix: str) -> dict[str, Any]:
    """The broker's CRL and ACL checks, against the running broker: the revoked certificate must
    be refused; PROBE_DEVICE publishes to `other_device`'s topic (the ACL must drop it) and then
    to its own (a marker that must arrive, so a probe that reached nothing cannot pass)."""
    results: dict[str, Any] = {}
    try:
        _probe_connect(port, probes[REVOKED_DEVICE]).close()
        results["crl_revoked_refused"] = False
    except (ssl.SSLError, OSError, ConnectionError):
        results["crl_revoked_refused"] = True
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = _probe_connect(port, probes[PROBE_DEVICE])
            break
        except (ssl.SSLError, OSError, ConnectionError):
            if time.monotonic() > deadline:
                results["acl_probe_connected"] = False
                return results
            time.sleep(0.5)
    with sock:
        for packet_id, (device, kind) in enumerate(((other_device, "forged"), (PROBE_DEVICE, "marker")), 1):
            body = orjson.dumps({"msg_id": f"{prefix}{kind}", "ts": int(time.time() * 1000), "values": {"battery": 1}})
            sock.sendall(publish_packet(f"devices/{device}/telemetry".encode(), packet_id, body))
            sock.recv(4)  # PUBACK (3.1.1 acknowledges a publish the ACL dropped, too)
        sock.sendall(DISCONNECT)
    results["acl_probe_connected"] = True
    return results


def broker_tls_config(pki_dir: Path, work_dir: Path, port: int) -> str:
    """The shipped mTLS listener on 127.0.0.1:port with the shipped ACL file and pki_dir's files."""
    work_dir.mkdir(parents=True, exist_ok=True)
    acl = work_dir / "acl"
    shutil.copyfile(ACL, acl)
    acl.chmod(0o600)
    return tls_listener_config(port, "127.0.0.1", pki_dir, acl)


# --------------------------------------------------------------------------- the loss checker


def stored_msg_counts(base_id: int, prefix: str, schema: str = SCHEMA) -> dict[str, int]:
    """Rows in the tenant's telemetry_raw per msg_id starting with prefix (rows after base_id)."""
    with schema_context(schema), connection.cursor() as cursor:
        cursor.execute(
            "SELECT msg_id, count(*) FROM telemetry_raw WHERE id > %s AND msg_id LIKE %s GROUP BY msg_id",
            [base_id, like_prefix(prefix)],
        )
        return {msg_id: int(count) for msg_id, count in cursor.fetchall()}


def stored_latencies(
    base_id: int, prefix: str, before: float | None = None, after: float | None = None
) -> tuple[list[float], int]:
    """Sorted stored_at - ts (ms) of the run's accepted rows (of those measured between `after`
    and `before`, epoch seconds, if given), and how many rows were not accepted."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM stored_at) * 1000 - (convert_from(payload, 'UTF8')::jsonb ->> 'ts')::float8,"
            " status, (convert_from(payload, 'UTF8')::jsonb ->> 'ts')::float8"
            " FROM telemetry_raw WHERE id > %s AND msg_id LIKE %s",
            [base_id, like_prefix(prefix)],
        )
        rows = cursor.fetchall()
    upper = before * 1000 if before is not None else float("inf")
    lower = after * 1000 if after is not None else float("-inf")
    accepted = sorted(float(r[0]) for r in rows if r[1] == "accepted" and lower <= r[2] < upper)
    return accepted, sum(1 for r in rows if r[1] != "accepted")


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run failed (empty: passed): anything acknowledged and lost, stored twice, rejected or
    never acknowledged; a device that never connected (or not back after the storm); nothing
    stored; a pipeline process that did not exit cleanly."""
    problems = [
        f"{key}={report[key]}" for key in ("lost", "duplicates", "rejected", "unacknowledged") if report.get(key)
    ]
    if not report.get("acked"):
        problems.append("acked=0")
    if report.get("connected_devices", 0) < report.get("devices", 0):
        problems.append(f"connected {report.get('connected_devices')} of {report.get('devices')} devices")
    if report.get("storm") and report.get("storm_all_back_s") is None:
        problems.append("not every device came back after the broker restart")
    if not report.get("drain_complete"):
        problems.append(f"drain_complete=False ({report.get('stored')} of {report.get('acked')} stored)")
    if report.get("crl_revoked_refused") is False:
        problems.append("the broker accepted a revoked certificate")
    if report.get("acl_forged_stored"):
        problems.append(f"acl_forged_stored={report['acl_forged_stored']} (a device wrote another device's topic)")
    if "acl_probe_connected" in report and not (report["acl_probe_connected"] and report.get("acl_marker_stored")):
        problems.append("the ACL probe's own message was not stored (the probe checked nothing)")
    problems += [f"{name} exited with {code}" for name, code in report.get("exit_codes", {}).items() if code != 0]
    return problems


def handshake_rates(connects: list[float], start: float) -> tuple[float, float]:
    """Mean and peak (best 1-s bucket) connections a second from `start` to the last of `connects`."""
    if not connects:
        return 0.0, 0.0
    buckets: dict[int, int] = {}
    for moment in connects:
        buckets[int(moment - start)] = buckets.get(int(moment - start), 0) + 1
    span = max(connects[-1] - start, 1e-3)
    return len(connects) / span, float(max(buckets.values()))


# --------------------------------------------------------------------------- the run


class FleetBench(Bench):
    """One fleet run: servers, pipeline, fleet, optional broker restart, drain, loss check."""

    def __init__(self, fleet: FleetSettings, out: Writer, *, pki_dir: Path | None = None) -> None:
        super().__init__(
            BenchSettings(
                rate=0,
                seconds=fleet.seconds,
                mode="endpoint",
                devices=fleet.devices,
                ingesters=1,
                sim_processes=1,
                private_nats=True,
            ),
            out,
        )
        self.fleet = fleet
        self.run_id = f"f{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
        self.pki_dir = pki_dir or Path(settings.BASE_DIR) / ".run" / "fleet-pki"
        self.tls_port = 0
        self.status = WorkerStatus()
        self._status_lock = threading.Lock()

    def log(self, text: str) -> None:
        self.out.write(f"fleet-bench: {text}\n")
        self.out.flush()

    @property
    def log_dir(self) -> Path:
        return Path(settings.BASE_DIR) / ".run" / "fleet-bench" / self.run_id

    def start_servers(self, log_dir: Path) -> dict[str, str]:
        """What Bench starts, the broker with the shipped mTLS listener added."""
        self.tls_port = free_port()
        self.broker_conf_extra = broker_tls_config(self.pki_dir, log_dir / "broker-tls", self.tls_port)
        return super().start_servers(log_dir)

    def _on_status(self, status: WorkerStatus) -> None:
        with self._status_lock:
            self.status = status

    def _wait(self, what: str, done: Callable[[WorkerStatus], bool], timeout: float, fleet: threading.Thread) -> bool:
        deadline, last_log = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline and fleet.is_alive():
            with self._status_lock:
                status = self.status
            if done(status):
                return True
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                self.log(
                    f"{what}: {status.connected} connected ({status.ever_connected} ever), {status.acked} acked, "
                    f"{status.connect_failures} connect failures"
                )
            assert self.pipeline is not None
            self.pipeline.check_alive()
            time.sleep(0.2)
        return False

    def run(self) -> dict[str, Any]:
        fleet = self.fleet
        migrate_database(self.log)
        ensure_tenant(SCHEMA, "Benchmark", self.log)
        ids = fleet_device_ids(fleet.devices)
        probes: dict[str, TlsIdentity] = {}
        with schema_context(SCHEMA):
            _device_type("endpoint")
            provision_fleet([*ids, PROBE_DEVICE, REVOKED_DEVICE], ENDPOINT_TYPE, self.log)
            tls: dict[str, TlsIdentity] = {}
            if fleet.transport == "mqtts":
                prepare_pki(self.pki_dir)
                tls = device_identities(ids, self.pki_dir, self.log)
                probes = probe_identities(self.pki_dir)
                certificate_crl_publish(out_dir=self.pki_dir)
        log_dir = self.log_dir
        env = self.start_servers(log_dir)
        broker = self.servers[0]
        base_id = max_raw_id()
        self.pipeline = start_pipeline(env, 1, log_dir)
        self.warm_up(ids[:1], base_id)
        url = f"mqtts://127.0.0.1:{self.tls_port}" if fleet.transport == "mqtts" else broker.url
        prefix = f"{self.run_id}-F"
        config = FleetConfig(
            devices=ids,
            mqtt_url=url,
            tls=tls,
            interval=fleet.interval,
            jitter=fleet.jitter,
            processes=fleet.processes,
            msg_id_prefix=prefix,
        )
        sim_pids: list[int] = []
        groups: dict[str, PidSource] = {
            **pipeline_pids(self.pipeline),
            "mosquitto": lambda: [broker.pid],
            "simulator": lambda: list(sim_pids),
        }
        samplers = {phase: ProcSampler(groups) for phase in ("connect", "steady", "storm")}
        stop = threading.Event()
        holder: dict[str, FleetResult] = {}
        runner = threading.Thread(
            target=lambda: holder.update(
                result=run_fleet(config, log_dir / "fleet", stop=stop, on_status=self._on_status, pids=sim_pids)
            ),
            daemon=True,
        )
        self.log(
            f"run {self.run_id}: {fleet.devices} devices over {fleet.transport} (port {self.tls_port or broker.port}), "
            f"one connection each, every {fleet.interval:g} s ± {fleet.jitter:.0%}, {fleet.processes} processes"
        )
        started = time.time()
        samplers["connect"].mark_start()
        runner.start()
        connected = self._wait("connecting", lambda s: s.ever_connected >= fleet.devices, CONNECT_WAIT, runner)
        connect_seconds = time.time() - started
        samplers["connect"].mark_end()
        self.log(f"all {fleet.devices} connected after {connect_seconds:.1f} s" if connected else "not all connected")
        samplers["steady"].mark_start()
        phase_start = time.time()
        storm: dict[str, Any] = {}
        self.probe_results: dict[str, Any] = {}
        if connected and fleet.storm:
            time.sleep(min(fleet.storm_after, fleet.seconds))
            samplers["steady"].mark_end()
            self.log("restarting the broker (SIGTERM, persistence kept)")
            samplers["storm"].mark_start()
            storm["restart_at"] = time.time()
            broker.restart(graceful=True)
            storm["up_at"] = time.time()
            self.log(f"broker back after {storm['up_at'] - storm['restart_at']:.1f} s; waiting for the fleet")
            if probes:
                # In the storm: the restarted broker still checks the CRL and the ACL.
                self.probe_results = run_probes(self.tls_port, probes, ids[0], f"{self.run_id}-A")
            self._wait(
                "reconnecting",
                lambda s: s.connected >= fleet.devices and s.connects >= 2 * fleet.devices,
                CONNECT_WAIT,
                runner,
            )
            samplers["storm"].mark_end()
        remaining = phase_start + fleet.seconds - time.time()
        if connected and remaining > 0:
            self._wait("publishing", lambda s: False, remaining, runner)
        if not fleet.storm:
            samplers["steady"].mark_end()
            if probes:
                self.probe_results = run_probes(self.tls_port, probes, ids[0], f"{self.run_id}-A")
        with self._status_lock:
            before_stop = self.status
        stop.set()
        runner.join()
        result = holder["result"]
        self.log(result.summary_line())
        stored = self.drain_fleet(base_id, prefix, len(result.acked))
        if self.probe_results:
            probe_rows = stored_msg_counts(base_id, f"{self.run_id}-A")
            self.probe_results["acl_forged_stored"] = sum(v for k, v in probe_rows.items() if "forged" in k)
            self.probe_results["acl_marker_stored"] = sum(v for k, v in probe_rows.items() if "marker" in k)
        self.exit_codes.update(stop_pipeline(self.pipeline))
        return self.report(base_id, prefix, result, samplers, connect_seconds, phase_start, storm, stored, before_stop)

    def drain_fleet(self, base_id: int, prefix: str, acked: int) -> int:
        stored, last_progress = -1, time.monotonic()
        while True:
            now_stored = len(stored_msg_counts(base_id, prefix))
            if now_stored != stored:
                stored, last_progress = now_stored, time.monotonic()
            if stored >= acked:
                self.drain_complete = True
                return stored
            if time.monotonic() - last_progress > DRAIN_IDLE_SECONDS:
                self.log(f"draining: nothing stored for {DRAIN_IDLE_SECONDS:.0f} s, giving up at {stored} of {acked}")
                return stored
            time.sleep(0.5)

    def report(
        self,
        base_id: int,
        prefix: str,
        result: FleetResult,
        samplers: dict[str, ProcSampler],
        connect_seconds: float,
        phase_start: float,
        storm: dict[str, Any],
        stored: int,
        before_stop: WorkerStatus,
    ) -> dict[str, Any]:
        fleet = self.fleet
        acked = result.acked
        outcome = compare("fleet", acked, stored_msg_counts(base_id, prefix))
        latencies, rejected = stored_latencies(base_id, prefix)
        # Messages measured once the whole fleet was up and before the storm (if any): the steady
        # state, without the connect phase's or the outage's backlog.
        steady_latencies, _ = stored_latencies(
            base_id, prefix, after=phase_start, before=storm.get("restart_at", time.time())
        )
        connected_at = result.connected_at
        first_connects = sorted(times[0] for times in connected_at.values() if times)
        mean_rate, peak_rate = handshake_rates(first_connects, first_connects[0] if first_connects else 0.0)
        report: dict[str, Any] = {
            "devices": fleet.devices,
            "transport": fleet.transport,
            "interval_s": fleet.interval,
            "seconds": fleet.seconds,
            "processes": fleet.processes,
            "connected_devices": sum(1 for times in connected_at.values() if times),
            # From starting the simulator (its processes, every device's TLS context) ...
            "connect_all_s": round(connect_seconds, 1),
            # ... and from the first device's CONNACK to the last device's first one.
            "connect_span_s": round(first_connects[-1] - first_connects[0], 1) if first_connects else None,
            "connects_per_s_mean": round(mean_rate, 1),
            "connects_per_s_peak": round(peak_rate, 1),
            "connected_at_stop": before_stop.connected,
            "generated": result.generated,
            "acked": len(acked),
            "stored": outcome.stored,
            "lost": outcome.lost,
            "duplicates": outcome.duplicates,
            "rejected": rejected,
            "unacknowledged": result.unacked,
            "drain_complete": self.drain_complete,
            "acked_msgs_per_s": round(len(acked) / max(1e-3, fleet.seconds), 1),
            "p50_latency_ms": round(percentile(latencies, 0.50), 1),
            "p99_latency_ms": round(percentile(latencies, 0.99), 1),
            "max_latency_ms": round(latencies[-1], 1) if latencies else 0.0,
            "steady_messages": len(steady_latencies),
            "steady_p50_latency_ms": round(percentile(steady_latencies, 0.50), 1),
            "steady_p99_latency_ms": round(percentile(steady_latencies, 0.99), 1),
            "connect_failures": result.connect_failures,
            "lost_connections": result.lost_connections,
            # While connecting, then publishing (before the storm, if any).
            "connect_cpu_cores_mosquitto": round(samplers["connect"].cores("mosquitto"), 2),
            "connect_cpu_cores_simulator": round(samplers["connect"].cores("simulator"), 2),
            "connect_cpu_cores_machine": round(samplers["connect"].machine_cores(), 2),
            "cpu_cores_mosquitto": round(samplers["steady"].cores("mosquitto"), 2),
            "rss_mb_mosquitto_peak": samplers["steady"].rss_mb("mosquitto")["peak"],
            "cpu_cores_bridge": round(samplers["steady"].cores("bridge"), 2),
            "cpu_cores_ingest": round(samplers["steady"].cores("ingest"), 2),
            "cpu_cores_simulator": round(samplers["steady"].cores("simulator"), 2),
            "cpu_cores_machine": round(samplers["steady"].machine_cores(), 2),
            **self.probe_results,
            "storm": fleet.storm,
            "exit_codes": self.exit_codes,
            "machine": machine_description(),
            "run_id": self.run_id,
        }
        if fleet.storm and storm:
            back = result.all_connected_after(storm["restart_at"])
            report["storm_broker_restart_s"] = round(storm["up_at"] - storm["restart_at"], 1)
            report["storm_all_back_s"] = None if back is None else round(back, 1)
            reconnects = result.connects_between(storm["restart_at"], storm["restart_at"] + (back or 0.0))
            mean_rate, peak_rate = handshake_rates(reconnects, storm["up_at"])
            report["storm_reconnects"] = len(reconnects)
            report["storm_handshakes_per_s_mean"] = round(mean_rate, 1)
            report["storm_handshakes_per_s_peak"] = round(peak_rate, 1)
            # Messages measured before the restart: the steady state's latency, without the outage's.
            steady, _ = stored_latencies(base_id, prefix, before=storm["restart_at"])
            report["p99_latency_ms_before_storm"] = round(percentile(steady, 0.99), 1)
            report["storm_cpu_cores_mosquitto"] = round(samplers["storm"].cores("mosquitto"), 2)
            report["storm_cpu_cores_simulator"] = round(samplers["storm"].cores("simulator"), 2)
            report["storm_cpu_cores_machine"] = round(samplers["storm"].machine_cores(), 2)
            report["storm_rss_mb_mosquitto_peak"] = samplers["storm"].rss_mb("mosquitto")["peak"]
        if result.failure_samples:
            report["first_connect_failures"] = result.failure_samples
        return report


def human_summary(r: dict[str, Any]) -> str:
    lines = [
        f"Argus fleet bench {r['run_id']} on {r['machine']}: {r['devices']} devices over {r['transport']}, "
        f"one connection each, every {r['interval_s']:g} s, {r['seconds']:g} s",
        f"  connect    all {r['connected_devices']} in {r['connect_all_s']} s (first to last {r['connect_span_s']} s) "
        f"({r['connects_per_s_mean']}/s mean, {r['connects_per_s_peak']}/s peak)",
        f"  messages   {r['acked']} acknowledged ({r['acked_msgs_per_s']}/s), {r['stored']} stored, "
        f"lost {r['lost']}, duplicates {r['duplicates']}, rejected {r['rejected']}, "
        f"unacknowledged {r['unacknowledged']}",
        f"  latency    steady p50 {r['steady_p50_latency_ms']} ms  p99 {r['steady_p99_latency_ms']} ms "
        f"({r['steady_messages']} messages); all p99 {r['p99_latency_ms']} ms  max {r['max_latency_ms']} ms",
        f"  broker     {r['cpu_cores_mosquitto']} cores, RSS peak {r['rss_mb_mosquitto_peak']} MB; "
        f"bridge {r['cpu_cores_bridge']} cores, ingest {r['cpu_cores_ingest']}, simulator {r['cpu_cores_simulator']}, "
        f"machine {r['cpu_cores_machine']}",
    ]
    if r.get("storm"):
        lines.append(
            f"  storm      broker restart {r.get('storm_broker_restart_s')} s, all back {r.get('storm_all_back_s')} s "
            f"after it; {r.get('storm_handshakes_per_s_mean')} handshakes/s mean, "
            f"{r.get('storm_handshakes_per_s_peak')}/s peak"
        )
    return "\n".join(lines)
