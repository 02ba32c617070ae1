"""Where a ``predict`` run's time goes: the stage breakdown printed at the end of every run and ``--profile``.

Stages: ``start-up`` (process start to the model load: interpreter, imports, listing the input and finding
what is done), ``model load`` (checkpoints, network), then per case ``read``, ``preprocess``, ``network``,
``export`` and ``write``. Reading, preprocessing and writing run in background threads while the main thread
runs the network and the export (batch.py), so a stage's time is counted two ways:

- **wall** (the main thread's time line): start-up, model load, network and export as they ran; for a
  background stage, the time the main thread spent *waiting* for it (for a case's input, the part of the wait
  that overlapped the case's preprocessing counts as preprocess, the rest, reading or queueing behind other
  cases, as read; for writes, recording the class CSVs and, at the end, waiting for the last masks). These add
  up to the run's wall time, up to ``other`` (progress bar, log lines, merging CSVs), which is printed too,
  and the interpreter's exit after the breakdown is printed.
- **busy**: the time spent in the stage by whichever thread ran it. Background stages overlap the network,
  so the busy times add up to more than the wall time when the overlap works; ``busy - wall`` of a background
  stage is what the overlap hid.

The statement the tests check: the wall column (without ``other``) adds up to the command's wall time,
measured outside the process, within 10%.
"""
import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional

from multitask_nnunet.io.atomic import atomic_write_text

STARTUP, MODEL_LOAD = "start-up", "model load"
READ, PREPROCESS, NETWORK, EXPORT, WRITE = "read", "preprocess", "network", "export", "write"
CASE_STAGES = (READ, PREPROCESS, NETWORK, EXPORT, WRITE)
STAGES = (STARTUP, MODEL_LOAD) + CASE_STAGES
OTHER = "other"


def process_start() -> Optional[float]:
    """``time.perf_counter()`` at the moment this process started (Linux: from /proc, 10 ms resolution), so
    that start-up includes the interpreter and the imports; None where that is not known."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.perf_counter() - max(age, 0.0)


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class Breakdown:
    """Collects a run's stage times (see the module docstring); thread-safe where background threads report."""

    def __init__(self, start: Optional[float] = None):
        self.start = time.perf_counter() if start is None else start
        self.end: Optional[float] = None
        self.wall: Dict[str, float] = defaultdict(float)
        self.busy: Dict[str, float] = defaultdict(float)
        self.cases: List[dict] = []
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, stage: str):
        """A stage run by the main thread: it counts as wall and busy time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.mark(stage, t0)

    def mark(self, stage: str, since: float) -> float:
        """The main thread spent ``since`` .. now in ``stage``; returns now."""
        now = time.perf_counter()
        self.ran(stage, now - since)
        return now

    def ran(self, stage: str, seconds: float) -> None:
        """The main thread spent ``seconds`` in ``stage`` (wall and busy time)."""
        with self._lock:
            self.wall[stage] += seconds
            self.busy[stage] += seconds

    def waited(self, stage: str, seconds: float) -> None:
        """The main thread waited ``seconds`` for a background stage (wall time only)."""
        with self._lock:
            self.wall[stage] += seconds

    def worked(self, stage: str, seconds: float) -> None:
        """A background thread spent ``seconds`` in ``stage`` (busy time only)."""
        with self._lock:
            self.busy[stage] += seconds

    def add_case(self, record: dict) -> None:
        with self._lock:
            self.cases.append(record)

    def finish(self) -> float:
        self.end = time.perf_counter()
        return self.end - self.start

    # ---------------------------------------------------------------- reporting
    def seconds(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def summary(self) -> dict:
        total = self.seconds()
        named = sum(self.wall[s] for s in STAGES)
        n = len(self.cases)
        stages = {s: {"wall_s": round(self.wall[s], 4), "busy_s": round(self.busy[s], 4),
                      **({"busy_per_case_s": round(self.busy[s] / n, 4)} if n and s in CASE_STAGES else {})}
                  for s in STAGES}
        return {"wall_s": round(total, 4), "stages_wall_sum_s": round(named, 4),
                "other_s": round(total - named, 4), "cases_predicted": n, "stages": stages}

    def lines(self) -> List[str]:
        summary, n = self.summary(), len(self.cases)
        lines = [f"time breakdown: {summary['wall_s']:.2f} s wall since the process started, {n} case(s) "
                 f"predicted ('wall': the main thread's time line, which adds up to the wall time; 'busy': time in "
                 f"the stage in any thread; reading, preprocessing and writing run beside the network)",
                 f"  {'stage':<11} {'wall s':>8} {'busy s':>8} {'busy s/case':>12}"]
        for s in STAGES:
            per_case = f"{self.busy[s] / n:>12.3f}" if n and s in CASE_STAGES else f"{'':>12}"
            lines.append(f"  {s:<11} {self.wall[s]:>8.2f} {self.busy[s]:>8.2f} {per_case}")
        lines.append(f"  {OTHER:<11} {summary['other_s']:>8.2f}")
        lines.append(f"  {'total':<11} {summary['wall_s']:>8.2f}")
        return lines

    def write_profile(self, path: str, extra: Optional[dict] = None) -> None:
        """Per-case JSON (atomic): the summary above plus one record per case, in the order they finished."""
        document = {"definition": __doc__.split("\n\n", 1)[1].strip(), **(extra or {}), **self.summary(),
                    "cases": self.cases}
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
