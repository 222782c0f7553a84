"""What a server process tree costs: CPU seconds and resident memory, read from /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from tests.support.servers import proc_stat

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its children (gunicorn's master and workers, nginx's master and workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(int(c) for c in children)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = proc_stat(pid)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return total


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Peak VmRSS of each process in `pids`, sampled every 50 ms while the block runs (VmHWM
    would include whatever an earlier scenario made the process peak at)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = {pid: rss_mib(pid) for pid in pids}
        self.before = dict(self.peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_mib(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed_cpu(pids: list[int], work) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds the processes used, result) of `work()`."""
    cpu = cpu_seconds(pids)
    started = time.monotonic()
    result = work()
    return time.monotonic() - started, cpu_seconds(pids) - cpu, result


def _busy_and_total() -> tuple[int, int]:
    # The first line of /proc/stat: every CPU's jiffies; idle and iowait are not busy.
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def quiet(threshold: float = 0.1, window: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until the machine is idle (under `threshold` of its CPUs busy over two windows
    in a row), so that a measurement does not share the cores with what the one before left
    running (distribution's proxy stores and verifies a blob after its clients are done);
    the seconds waited."""
    started = time.monotonic()
    calm = 0
    while calm < 2 and time.monotonic() - started < timeout:
        busy, total = _busy_and_total()
        time.sleep(window)
        busy2, total2 = _busy_and_total()
        calm = calm + 1 if (busy2 - busy) < threshold * max(1, total2 - total) else 0
    return time.monotonic() - started
