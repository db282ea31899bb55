"""What one chunked transaction costs, in isolation: CPU of this process (and wall time) to ingest
its 67 chunks in batches, and to reassemble it as the Celery task does (reassembly, live notes,
the assets hook), for BENCH_TRANSACTIONS (40) transactions of 2000 beacons.

    DEBUG=1 .venv/bin/python -m devtools.chunk_cost      (after one `make chunk-bench` run)

Uses tenant `bench` and the gateways `make chunk-bench` created (their 2000 beacons each already
registered). A noisy neighbour stretches wall time more than this process's CPU time, so the CPU
figures compare code on a shared machine better than the benchmark's latencies do. The last
line is one JSON object.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
django.setup()

from django.utils import timezone  # noqa: E402
from django_tenants.utils import schema_context  # noqa: E402

from devices.models import Device  # noqa: E402
from devtools.bench import SCHEMA  # noqa: E402
from devtools.chunk_bench import BEACONS, CHUNK_SIZE, TYPE_NAME  # noqa: E402
from devtools.simulator import PayloadFactory, SimulatorConfig  # noqa: E402
from telemetry.ingest import ingest_batch  # noqa: E402
from telemetry.messages import IncomingMessage  # noqa: E402
from telemetry.tasks import profiles, reassemble_transaction  # noqa: E402

BATCH = 20  # chunks per ingest batch, about what runingest's batches hold at 20 transactions/s


def main() -> int:
    count = int(os.environ.get("BENCH_TRANSACTIONS", "40"))
    with schema_context(SCHEMA):
        gateways = list(
            Device.objects.filter(device_type__name=TYPE_NAME, children__isnull=False)
            .distinct()
            .order_by("logical_identifier")
            .values_list("logical_identifier", flat=True)[:20]
        )
    if not gateways:
        print("chunk-cost: no gateways with registered beacons in tenant 'bench': run make chunk-bench once")
        return 1
    config = SimulatorConfig(
        devices=gateways,
        mqtt_url="mqtt://unused",
        mode="gateway_chunked",
        beacons=BEACONS,
        chunk_size=CHUNK_SIZE,
        child_metrics=1,
    )
    factory = PayloadFactory(config, f"cost-{uuid.uuid4().hex[:8]}-", random.Random(1))  # noqa: S311
    ingest_cpu = reassemble_cpu = reassemble_wall = 0.0
    done = 0
    with schema_context(SCHEMA):
        for n in range(count + 2):
            gateway = gateways[n % len(gateways)]
            chunks = factory.transaction(gateway)
            started = time.process_time()
            completed: list[int] = []
            for i in range(0, len(chunks), BATCH):
                messages = [
                    IncomingMessage(key=uuid.uuid4().hex, logical_id=gateway, received_at=timezone.now(), payload=p)
                    for p, _ in chunks[i : i + BATCH]
                ]
                completed += ingest_batch(messages=messages, profiles=profiles).completed_transactions
            ingested = time.process_time()
            wall = time.perf_counter()
            for tx_pk in completed:
                status = reassemble_transaction.run(tx_pk)
                if status != "complete":
                    print(f"chunk-cost: transaction {tx_pk} ended {status}")
                    return 1
            if n >= 2:  # the first two warm the caches
                ingest_cpu += ingested - started
                reassemble_cpu += time.process_time() - ingested
                reassemble_wall += time.perf_counter() - wall
                done += len(completed)
    report = {
        "transactions": done,
        "ingest_cpu_ms_per_transaction": round(ingest_cpu * 1000 / done, 2),
        "reassemble_cpu_ms_per_transaction": round(reassemble_cpu * 1000 / done, 2),
        "reassemble_wall_ms_per_transaction": round(reassemble_wall * 1000 / done, 2),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
