"""What the benchmarks measure alike, for the pipeline and the bare chain (devtools/bench.py,
devtools/baseline.py): CPU and RSS of process groups sampled from /proc, the cost per message,
the sustained rate, percentiles, and the LIKE pattern of a run's msg_ids."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import connection

SAMPLE_INTERVAL = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The drain lasts as long as rows keep arriving: it gives up only after this long without one
# (a stalled pipeline), however long the whole drain takes.
DRAIN_IDLE_SECONDS = 60.0


# --------------------------------------------------------------------------- process sampling


@dataclass
class ProcSample:
    cpu_seconds: float
    rss_bytes: int


def read_proc(pid: int, reaped: bool = False) -> ProcSample | None:
    """CPU seconds (user + system) and resident memory of a live process, from /proc; with
    `reaped`, the CPU of its children that have exited and been waited for is included."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # Fields after the ")" closing the command name: utime and stime are fields 14 and 15.
    fields = stat.rpartition(")")[2].split()
    cpu = sum(int(f) for f in fields[11 : 15 if reaped else 13]) / CLOCK_TICKS
    rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return ProcSample(cpu_seconds=cpu, rss_bytes=rss_kb * 1024)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


@dataclass
class _Series:
    start: ProcSample | None = None
    end: ProcSample | None = None
    peak_rss: int = 0


PidSource = Sequence[int] | Callable[[], Sequence[int]]


class ProcSampler:
    """Samples CPU and RSS of named process groups every SAMPLE_INTERVAL between mark_start and
    mark_end. A group is a list of pids, or a function giving the pids now (asked at every
    sample: PostgreSQL backends come and go as Django reconnects, every DB_CONN_MAX_AGE seconds).
    CPU is counted per process from its first sample to its last, so one that exits keeps what
    it used. For the groups named in `reaped` the CPU of exited children is counted too (the load
    generator: this process and the simulator worker processes it started and waited for)."""

    def __init__(self, groups: Mapping[str, PidSource], reaped: Collection[str] = ()) -> None:
        self.groups = groups
        self.reaped = set(reaped)
        self.series = {name: _Series() for name in groups}
        self._first: dict[str, dict[int, float]] = {name: {} for name in groups}
        self._last: dict[str, dict[int, float]] = {name: {} for name in groups}
        self.started_at = self.ended_at = 0.0
        self.busy_start = self.busy_end = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _pids(self, name: str) -> Sequence[int]:
        source = self.groups[name]
        return source() if callable(source) else source

    def _sample(self, name: str) -> ProcSample | None:
        reaped = name in self.reaped
        samples = {pid: read_proc(pid, reaped) for pid in self._pids(name)}
        live = {pid: sample for pid, sample in samples.items() if sample is not None}
        for pid, sample in live.items():
            self._first[name].setdefault(pid, sample.cpu_seconds)
            self._last[name][pid] = sample.cpu_seconds
        if not live:
            return None
        return ProcSample(sum(s.cpu_seconds for s in live.values()), sum(s.rss_bytes for s in live.values()))

    def _record(self) -> None:
        for name, series in self.series.items():
            sample = self._sample(name)
            if sample is not None:
                series.peak_rss = max(series.peak_rss, sample.rss_bytes)
                series.end = sample

    def _run(self) -> None:
        try:
            while not self._stop.wait(SAMPLE_INTERVAL):
                self._record()
        finally:
            connection.close()  # this thread's, if a pid source queried the database

    def mark_start(self) -> None:
        self.started_at = time.monotonic()
        self.busy_start = machine_busy_seconds()
        for name, series in self.series.items():
            series.start = series.end = self._sample(name)
            series.peak_rss = series.start.rss_bytes if series.start else 0
        self._thread.start()

    def mark_end(self) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self.ended_at = time.monotonic()
        self.busy_end = machine_busy_seconds()

    def cpu_seconds(self, name: str) -> float:
        """CPU seconds the group's processes used between mark_start and mark_end."""
        first, last = self._first[name], self._last[name]
        return max(0.0, sum(last[pid] - first[pid] for pid in last))

    def pids_seen(self, name: str) -> int:
        """How many processes of the group were sampled at least once."""
        return len(self._last[name])

    def cores(self, name: str) -> float:
        wall = self.ended_at - self.started_at
        return self.cpu_seconds(name) / wall if wall > 0 else 0.0

    def machine_cores(self) -> float:
        wall = self.ended_at - self.started_at
        return (self.busy_end - self.busy_start) / wall if wall > 0 else 0.0

    def rss_mb(self, name: str) -> dict[str, float]:
        series = self.series[name]

        def mb(value: int) -> float:
            return round(value / 1024**2, 1)

        return {
            "start": mb(series.start.rss_bytes) if series.start else 0.0,
            "end": mb(series.end.rss_bytes) if series.end else 0.0,
            "peak": mb(series.peak_rss),
        }


# The processes whose CPU makes up a chain's cost per message (the load generator, and the
# PostgreSQL server's background processes, which serve every database on the server, are
# reported beside it, not in it).
CHAIN_GROUPS = ("bridge", "ingest", "mosquitto", "nats", "postgres")


def postgres_pids(application_name: str) -> dict[str, Callable[[], list[int]]]:
    """The PostgreSQL server processes to sample, as pid sources asked at every sample:
    `postgres`, the backends whose connections carry this application_name (the chain's own:
    runbridge, runingest or the bare consumer), and `postgres_background`, the WAL writer,
    checkpointer and background writer (shared with any other database on the server). Sampled
    from /proc, so only when the server runs on this machine."""

    def backends() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name])
            return [row[0] for row in cursor.fetchall()]

    def background() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')"
            )
            return [row[0] for row in cursor.fetchall()]

    return {"postgres": backends, "postgres_background": background}


def cost_report(sampler: ProcSampler, stored: int, prefix: str, total_key: str) -> dict[str, Any]:
    """Cores of every sampled group (`<prefix>cpu_cores_<group>`), core-ms per 1,000 stored
    messages of each (`<prefix>core_ms_per_1k_<group>`) and of the chain's own (CHAIN_GROUPS,
    `total_key`); the load generator and PostgreSQL's background processes are outside the total."""
    per_1k = 1000 * 1000 / stored if stored else 0.0
    report: dict[str, Any] = {f"{prefix}cpu_cores_{name}": round(sampler.cores(name), 2) for name in sampler.groups}
    report.update(
        {f"{prefix}core_ms_per_1k_{name}": round(sampler.cpu_seconds(name) * per_1k, 1) for name in sampler.groups}
    )
    report[total_key] = round(sum(sampler.cpu_seconds(n) for n in CHAIN_GROUPS if n in sampler.groups) * per_1k, 1)
    report[f"{prefix}postgres_backends_sampled"] = sampler.pids_seen("postgres") if "postgres" in sampler.groups else 0
    return report


@dataclass(frozen=True)
class SustainedRate:
    """What a chain stored per second, and which window that was measured over."""

    msgs_per_s: float
    basis: str
    kept_up: bool
    drain_seconds: float


def sustained_rate(
    *, stored: int, expected: int, first_send: float, last_send: float, first_stored: float, last_stored: float
) -> SustainedRate:
    """The sustained rate of a run (times in epoch seconds), measured the same way for every chain.

    If the chain kept up (everything stored, the last message within a couple of seconds of the
    last send) it stored at the offered rate over the load window, and stored / send duration is
    the honest figure: the first and last stored_at sit on batch boundaries, so a short window
    measured from them is noisy. If it fell behind, a backlog built up and it was busy from its
    first to its last insert: then stored / (last stored_at - first stored_at) is its ceiling (a
    long drain shows up here).
    """
    send_duration = max(0.0, last_send - first_send)
    drain = max(0.0, last_stored - last_send) if stored else 0.0
    kept_up = stored == expected and stored > 0 and drain <= max(2.0, 0.1 * send_duration)
    if kept_up and send_duration > 0:
        return SustainedRate(stored / send_duration, "load window (kept up)", True, drain)
    if stored and last_stored > first_stored:
        return SustainedRate(
            stored / (last_stored - first_stored), "first to last stored_at (fell behind)", kept_up, drain
        )
    return SustainedRate(0.0, "nothing stored", kept_up, drain)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
