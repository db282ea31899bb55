"""Open dashboard pages for the benchmark (`BENCH_LIVE_PAGES=20 make bench`): the ASGI server,
N event streams of a signed-in user, and a probe device whose readings are timed from the MQTT
publish to their arrival on every open page.

Each page reads its stream as a browser's EventSource does (one long HTTP response) and names
its devices as the dashboard does (`?devices=`: the probe and some of the benchmark's devices).
What it reports: events/s and bytes/s per page, and the probe's publish → page latency.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from django.contrib.auth import get_user_model
from django.test import Client
from django_tenants.utils import schema_context
from paho.mqtt.enums import CallbackAPIVersion

from devices.models import Device
from devtools.services import free_port, port_open
from devtools.simulator import TOPIC
from devtools.supervisor import Child, ChildError, live_server

PROBE_METRIC = "temperature"


@dataclass
class _Page:
    """One open page's stream and what arrived on it."""

    events: int = 0
    pings: int = 0
    bytes: int = 0
    probes: dict[int, float] = field(default_factory=dict)  # probe number -> arrival (unix s)
    error: str = ""


class LivePages:
    """The live server and N open pages of tenant `schema` on `host`, fed by runingest's events."""

    def __init__(
        self, *, env: dict[str, str], log_dir: Path, schema: str, host: str, pages: int, page_devices: list[str]
    ) -> None:
        self.env, self.schema, self.host, self.pages_wanted = env, schema, host, pages
        self.port = free_port()
        self.server = Child(
            "live",
            live_server(self.port),
            log_dir / "live.log",
            env=env,
        )
        self.page_devices = page_devices
        self.pages: list[_Page] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._probe_stop = threading.Event()
        self.probe_sent: dict[int, float] = {}
        self.first_event_at = 0.0

    # ------------------------------------------------------------------ setup

    def start(self) -> None:
        with schema_context(self.schema):
            device_type = Device.objects.get(logical_identifier=self.page_devices[0]).device_type
            self.probe, _ = Device.objects.get_or_create(
                logical_identifier="BENCH-LIVE-PROBE", defaults={"device_type": device_type, "name": "live probe"}
            )
            ids = [str(self.probe.pk)] + [
                str(pk)
                for pk in Device.objects.filter(logical_identifier__in=self.page_devices[:19]).values_list(
                    "pk", flat=True
                )
            ]
            user, _ = get_user_model()._default_manager.get_or_create(username="bench-live-viewer")
            client = Client(HTTP_HOST=self.host)
            client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
            self.cookie = f"sessionid={client.cookies['sessionid'].value}"
        self.path = "/dashboard/events?devices=" + ",".join(ids)
        self.server.start()
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", self.port):
            self.server.check_alive()
            if time.monotonic() > deadline:
                raise ChildError(f"the live server did not listen within 60 s\n{self.server.tail()}")
            time.sleep(0.2)
        for _ in range(self.pages_wanted):
            page = _Page()
            self.pages.append(page)
            thread = threading.Thread(target=self._read, args=(page,), daemon=True, name="live-page")
            self._threads.append(thread)
            thread.start()
        # Every page has its stream open (it answered its first `ping`) before the load starts.
        deadline = time.monotonic() + 30
        while any(p.pings == 0 and not p.error for p in self.pages):
            if time.monotonic() > deadline:
                raise ChildError("not every page's event stream opened within 30 s")
            time.sleep(0.1)
        errors = [p.error for p in self.pages if p.error]
        if errors:
            raise ChildError(f"event streams failed: {errors[:3]}")

    def _read(self, page: _Page) -> None:
        probe_key = f'"{self.probe.pk}":'.encode()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            headers = {"Host": self.host, "Cookie": self.cookie, "Accept": "text/event-stream"}
            conn.request("GET", self.path, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                page.error = f"HTTP {response.status}: {response.read(300)!r}"
                return
            if conn.sock is not None:
                self._sockets.append(conn.sock)
            while not self._stop.is_set():
                line = response.fp.readline()
                if not line:
                    break
                page.bytes += len(line)
                if line.startswith(b"event: ping"):
                    page.pings += 1
                elif line.startswith(b"data: ") and line != b"data: {}\n":
                    page.events += 1
                    if probe_key in line:
                        self._note_probe(page, line[6:])
        except OSError as exc:
            if not self._stop.is_set():
                page.error = f"{type(exc).__name__}: {exc}"

    def _note_probe(self, page: _Page, data: bytes) -> None:
        now = time.time()
        reading = orjson.loads(data).get("devices", {}).get(str(self.probe.pk))
        if reading is None:
            return
        number = round(reading["values"].get(PROBE_METRIC, -1) * 100) - 2000
        if number in self.probe_sent and number not in page.probes:
            page.probes[number] = now

    # ------------------------------------------------------------------ the probe

    def start_probe(self, broker_url: str, run_id: str) -> None:
        """Publish one probe reading a second (QoS 1) until stop(), each with its own value."""
        host, _, port = broker_url.removeprefix("mqtt://").partition(":")
        self._mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"argus-live-probe-{uuid.uuid4().hex[:8]}")
        self._mqtt.connect(host, int(port or 1883))
        self._mqtt.loop_start()
        self._probe_thread = threading.Thread(target=self._probe, args=(run_id,), daemon=True, name="live-probe")
        self._probe_thread.start()

    def stop_probe(self) -> None:
        """No more probe readings (the end of the load)."""
        self._probe_stop.set()
        self._probe_thread.join(5)

    def _probe(self, run_id: str) -> None:
        number = 0
        while not self._probe_stop.wait(1.0):
            number = (number + 1) % 8000  # the value 20.00 + n/100 stays inside the type's schema
            sent = time.time()
            document = {
                "msg_id": f"{run_id}-V{number}-{uuid.uuid4().hex[:6]}",
                "ts": int(sent * 1000),
                "values": {PROBE_METRIC: round(20 + number / 100, 2)},
            }
            self.probe_sent[number] = sent
            self._mqtt.publish(TOPIC.format(self.probe.logical_identifier), orjson.dumps(document), qos=1)

    # ------------------------------------------------------------------ results

    def mark(self) -> None:
        """Start of the measured window."""
        self._marked = (time.monotonic(), [(p.events, p.bytes) for p in self.pages])

    def report(self, grace: float = 5.0) -> dict[str, Any]:
        """Events and bytes per page per second since mark(), and the probe's latency on the pages
        (call after stop_probe() and the drain: a probe still missing `grace` s later is missed)."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(n not in p.probes for p in self.pages for n in self.probe_sent):
            time.sleep(0.1)
        started, counts = self._marked
        seconds = max(time.monotonic() - started, 1e-9)
        events = [(p.events - e) / seconds for p, (e, _) in zip(self.pages, counts, strict=True)]
        byte_rates = [(p.bytes - b) / seconds for p, (_, b) in zip(self.pages, counts, strict=True)]
        due = dict(self.probe_sent)
        latencies = sorted(p.probes[n] - t for p in self.pages for n, t in due.items() if n in p.probes)
        missed = sum(1 for p in self.pages for n in due if n not in p.probes)

        def pct(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else 0.0

        return {
            "live_pages": len(self.pages),
            "live_events_per_s_per_page": round(sum(events) / len(events), 2) if events else 0.0,
            "live_events_per_s_per_page_max": round(max(events), 2) if events else 0.0,
            "live_kb_per_s_per_page": round(sum(byte_rates) / len(byte_rates) / 1024, 1) if byte_rates else 0.0,
            "live_probes": len(due),
            "live_probe_deliveries": len(latencies),
            "live_probe_missed": missed,
            "live_latency_p50_ms": pct(0.50),
            "live_latency_p99_ms": pct(0.99),
            "live_latency_max_ms": round(latencies[-1] * 1000, 1) if latencies else 0.0,
            "live_page_errors": [p.error for p in self.pages if p.error][:3],
        }

    def stop(self) -> int | None:
        self._stop.set()
        self._probe_stop.set()
        mqtt_client = getattr(self, "_mqtt", None)
        if mqtt_client is not None:
            mqtt_client.loop_stop()
            mqtt_client.disconnect()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return self.server.stop(20)
