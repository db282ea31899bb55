"""`manage.py simulate`: device fleet simulator / load generator (logic in devtools.simulator)."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from devtools.fleet import FleetConfig, run_fleet
from devtools.simulator import (
    DEFAULT_WINDOW,
    MODES,
    TRANSPORTS,
    SimulatorConfig,
    SimulatorError,
    TlsIdentity,
    device_ids,
    run_simulation,
    tls_from_directory,
)


class Command(BaseCommand):
    help = (
        "Simulate devices publishing telemetry over MQTT, MQTT with mTLS, or HTTP. Runs until "
        "--seconds/--messages are reached or Ctrl-C, then prints one summary line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--transport", choices=TRANSPORTS, default="mqtt")
        parser.add_argument("--mqtt-url", default="", help="Broker URL (default: MQTT_URL).")
        parser.add_argument("--devices", nargs="+", default=[], metavar="LOGICAL_ID", help="Device logical ids.")
        parser.add_argument("--prefix", default="", help="Generate ids <prefix>0000.. (with --count).")
        parser.add_argument("--count", type=int, default=0, help="How many generated ids.")
        parser.add_argument("--mode", choices=MODES, default="endpoint")
        parser.add_argument("--rate", type=float, default=10.0, help="Messages per second in total; 0 = flat out.")
        parser.add_argument("--seconds", type=float, default=None, help="Stop after this many seconds.")
        parser.add_argument("--messages", type=int, default=None, help="Stop after this many messages in total.")
        parser.add_argument("--processes", type=int, default=1, help="Worker processes (each its own connections).")
        parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
        parser.add_argument(
            "--presence",
            action="store_true",
            help="mqtt/mqtts: one connection per device, each with a last will and an online message on "
            "devices/<id>/status (docs/ingestion.md).",
        )
        parser.add_argument(
            "--lean",
            action="store_true",
            help="mqtt: a minimal hand-rolled publisher, far cheaper than paho (load tests).",
        )
        parser.add_argument("--children", type=int, default=50, help="gateway: children per message.")
        parser.add_argument("--beacons", type=int, default=2000, help="gateway_chunked: children per report.")
        parser.add_argument("--chunk-size", type=int, default=30, help="gateway_chunked: children per chunk.")
        parser.add_argument("--shuffle", action="store_true", help="gateway_chunked: send chunks in random order.")
        parser.add_argument(
            "--window", type=int, default=DEFAULT_WINDOW, help="Most unacknowledged QoS 1 messages per process."
        )
        parser.add_argument("--msg-id-prefix", default="", help="Prefix of every msg_id (default: random run id).")
        parser.add_argument("--cert", help="mqtts: client certificate (single device).")
        parser.add_argument("--key", help="mqtts: client key (single device).")
        parser.add_argument("--ca", help="mqtts/https: CA certificate (default: <cert-dir>/ca.crt).")
        parser.add_argument(
            "--cert-dir",
            type=Path,
            help=(
                "mqtts: PKI directory from `manage.py pki` (devices/<id>/<serial>.crt/.key) or the bundles of "
                "`manage.py provision --issue-certificates DIR` (<id>/device.crt, device.key, ca.crt); "
                "default ARGUS_PKI_DIR."
            ),
        )
        parser.add_argument(
            "--url", default="", help="http: ingestion URL, e.g. http://localhost:8000/api/v1/telemetry"
        )
        fleet = parser.add_argument_group(
            "fleet mode",
            "--fleet: one MQTT connection per device (mqtt or mqtts with each device's own certificate), a "
            "persistent session, QoS 1, one endpoint message every --interval s with --jitter, reconnecting "
            "with jittered exponential backoff (devtools/fleet.py); runs for --seconds or until Ctrl-C.",
        )
        fleet.add_argument("--fleet", action="store_true", help="one connection per device (see above)")
        fleet.add_argument("--interval", type=float, default=10.0, help="fleet: seconds between a device's messages")
        fleet.add_argument("--jitter", type=float, default=0.1, help="fleet: each gap is interval x [1-j, 1+j]")
        fleet.add_argument("--keepalive", type=int, default=60, help="fleet: MQTT keepalive in seconds")
        parser.add_argument(
            "--api-key",
            action="append",
            default=[],
            metavar="KEY",
            help="http: API key from create_device_key; once per device in --devices order, or ID=KEY.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        devices = list(options["devices"])
        if options["prefix"] or options["count"]:
            if options["count"] < 1:
                raise CommandError("--prefix needs --count N (N >= 1)")
            devices += device_ids(options["prefix"], options["count"])
        if not devices:
            raise CommandError("name devices with --devices ID... or --prefix P --count N")
        if options["fleet"]:
            self._fleet(devices, options)
            return
        config = SimulatorConfig(
            devices=devices,
            transport=options["transport"],
            mqtt_url=options["mqtt_url"] or settings.MQTT_URL,
            mode=options["mode"],
            rate=options["rate"],
            seconds=options["seconds"],
            messages=options["messages"],
            processes=options["processes"],
            qos=options["qos"],
            lean=options["lean"],
            children=options["children"],
            beacons=options["beacons"],
            chunk_size=options["chunk_size"],
            shuffle_chunks=options["shuffle"],
            msg_id_prefix=options["msg_id_prefix"],
            window=options["window"],
            presence=options["presence"],
        )
        if options["transport"] == "mqtts":
            config.tls = self._tls(devices, options)
        if options["transport"] == "http":
            config.http_url = options["url"]
            config.http_ca = options["ca"] or ""
            config.api_keys = self._api_keys(devices, options["api_key"])
        limit = (
            f"{options['messages']} messages"
            if options["messages"] is not None
            else (f"{options['seconds']:g} s" if options["seconds"] is not None else "Ctrl-C")
        )
        rate = "flat out" if not options["rate"] else f"{options['rate']:g} msg/s"
        self.stdout.write(
            f"simulate: {len(devices)} {options['mode']} device(s) over {options['transport']} at {rate} until {limit}"
        )
        try:
            result = run_simulation(config)
        except SimulatorError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(result.summary_line())
        if result.errors:
            raise CommandError(f"{result.errors} message(s) failed")

    def _fleet(self, devices: list[str], options: dict[str, Any]) -> None:
        if options["transport"] not in ("mqtt", "mqtts"):
            raise CommandError("--fleet runs over mqtt or mqtts")
        url = options["mqtt_url"] or settings.MQTT_URL
        if options["transport"] == "mqtts":
            url = "mqtts://" + url.split("://", 1)[-1]
        config = FleetConfig(
            devices=devices,
            mqtt_url=url,
            tls=self._tls(devices, options) if options["transport"] == "mqtts" else {},
            interval=options["interval"],
            jitter=options["jitter"],
            seconds=options["seconds"],
            processes=options["processes"],
            keepalive=options["keepalive"],
            msg_id_prefix=options["msg_id_prefix"] or f"fleet{int(time.time())}-",
        )
        self.stdout.write(
            f"simulate: fleet of {len(devices)} devices over {options['transport']} ({url}), one connection each, "
            f"every {options['interval']:g} s ± {options['jitter']:.0%}"
        )
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        try:
            with tempfile.TemporaryDirectory(prefix="argus-fleet-") as work_dir:
                result = run_fleet(config, Path(work_dir), stop=stop)
        except SimulatorError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            signal.signal(signal.SIGINT, previous)
        self.stdout.write(result.summary_line())
        if result.unacked:
            raise CommandError(f"{result.unacked} message(s) not acknowledged")

    def _tls(self, devices: list[str], options: dict[str, Any]) -> dict[str, TlsIdentity]:
        if options["cert"] or options["key"]:
            if not (options["cert"] and options["key"] and options["ca"]):
                raise CommandError("--cert needs --key and --ca")
            if len(devices) != 1:
                raise CommandError("--cert/--key identify one device; use --cert-dir for several")
            return {devices[0]: TlsIdentity(cert=options["cert"], key=options["key"], ca=options["ca"])}
        cert_dir = Path(options["cert_dir"] or settings.ARGUS_PKI_DIR)
        if all((cert_dir / d / "device.crt").is_file() for d in devices):
            # The bundles `manage.py provision --issue-certificates DIR` writes: DIR/<id>/device.crt, .key, ca.crt.
            return {
                d: TlsIdentity(
                    cert=str(cert_dir / d / "device.crt"),
                    key=str(cert_dir / d / "device.key"),
                    ca=options["ca"] or str(cert_dir / d / "ca.crt"),
                )
                for d in devices
            }
        try:
            return tls_from_directory(cert_dir, devices, options["ca"])
        except SimulatorError as exc:
            raise CommandError(str(exc)) from exc

    def _api_keys(self, devices: list[str], given: list[str]) -> dict[str, str]:
        named = dict(item.split("=", 1) for item in given if "=" in item and item.split("=", 1)[0] in devices)
        positional = [item for item in given if not ("=" in item and item.split("=", 1)[0] in devices)]
        if positional:
            if len(positional) == 1 and len(devices) == 1:
                named[devices[0]] = positional[0]
            elif len(positional) == len(devices):
                named.update(zip(devices, positional, strict=True))
            else:
                raise CommandError("give one --api-key per device (in --devices order) or ID=KEY pairs")
        missing = [d for d in devices if d not in named]
        if missing:
            raise CommandError(f"no --api-key for {', '.join(missing[:5])}")
        return named
