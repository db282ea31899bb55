"""Sampling profiles of the pipeline's processes under load, for the benchmarks (BENCH_PROFILE=1).

py-spy (the dev extra) samples each process from outside — no code in it changes — while the
load runs, and writes its stacks in py-spy's raw ("collapsed") form, one line per distinct stack
with its sample count. `summarise()` turns such a file into the two tables BENCHMARKS.md shows:
where the samples were when taken (self) and which functions were on the stack (total), each as
a percentage of the samples in which the process was busy (py-spy leaves out idle threads: a
loop waiting in epoll, a thread blocked on a socket or a lock).

Sampling another process needs ptrace rights (root, or CAP_SYS_PTRACE); `--nonblocking` keeps
py-spy from pausing the process at each sample, so the profile costs it nothing measurable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Frames every sample passes through (thread start, the event loop, the management command):
# left out of the "total" table, which is about where the work is.
PLUMBING_FILES = (
    "threading.py",
    "concurrent/futures/",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "asyncio/runners.py",
    "manage.py",
    "django/core/management/",
    "argus/runner.py",
)

# py-spy's raw frames: "function (path/to/file.py:line)" or, with --nolineno, "function (path/to/file.py)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Row:
    """One function of a profile: its share of the busy samples, on top of the stack and anywhere in it."""

    function: str
    self_pct: float
    total_pct: float


@dataclass(frozen=True)
class Summary:
    samples: int
    by_self: list[Row]
    by_total: list[Row]

    def text(self, title: str, top: int = 15) -> str:
        """Markdown tables of the top frames by self and by total share."""
        lines = [f"{title}: {self.samples} busy samples", "", "| self % | function |", "|---:|---|"]
        lines += [f"| {r.self_pct:.1f} | `{r.function}` |" for r in self.by_self[:top]]
        lines += ["", "| total % | function |", "|---:|---|"]
        lines += [f"| {r.total_pct:.1f} | `{r.function}` |" for r in self.by_total[:top]]
        return "\n".join(lines)


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({match['file']})"


def _plumbing(name: str) -> bool:
    file = name.rpartition(" (")[2].rstrip(")")
    return file.startswith(PLUMBING_FILES)


def summarise(collapsed: str) -> Summary:
    """Self and total shares per function from py-spy's raw output."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f]
        # Thread names (with --threads) are not functions.
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            anywhere[name] += count
    if not samples:
        return Summary(0, [], [])

    def row(name: str) -> Row:
        return Row(name, 100.0 * own[name] / samples, 100.0 * anywhere[name] / samples)

    by_self = [row(name) for name, _ in own.most_common()]
    by_total = [row(name) for name, _ in anywhere.most_common() if not _plumbing(name)]
    return Summary(samples, by_self, by_total)


class Profiles:
    """py-spy on some processes for a while: `start()` them, `finish()` and read the summaries."""

    def __init__(self, out_dir: Path, pids: dict[str, int], seconds: float, rate: int = 100) -> None:
        self.out_dir = out_dir
        self.pids = pids
        self.seconds = seconds
        self.rate = rate
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    @staticmethod
    def executable() -> str:
        beside = Path(sys.executable).parent / "py-spy"
        found = str(beside) if beside.exists() else shutil.which("py-spy")
        if found is None:
            raise RuntimeError("py-spy is not installed (the dev extra: make install)")
        return found

    def path(self, name: str) -> Path:
        return self.out_dir / f"profile-{name}.txt"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            argv = [
                self.executable(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(self.seconds))),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--nolineno",
                "--nonblocking",
                "--output",
                str(self.path(name)),
            ]
            log = (self.out_dir / f"profile-{name}.log").open("wb")
            self._running[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 30.0) -> dict[str, Summary]:
        """Wait for every recorder (they stop by themselves after `seconds`) and summarise."""
        summaries: dict[str, Summary] = {}
        for name, process in self._running.items():
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(timeout=10)
            path = self.path(name)
            if path.exists():
                summaries[name] = summarise(path.read_text(errors="replace"))
        self._running.clear()
        return summaries
