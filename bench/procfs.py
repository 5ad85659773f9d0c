"""What Linux says about a process: peak resident memory and CPU time, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set size (VmHWM) in MiB, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; fields after it are space-separated.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children(parent: int) -> list[int]:
    """Direct children of `parent` (e.g. the backends of a postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds used by named groups of processes between `start()` and `stop()`.

    Groups are given as callables returning pids, so processes that appear during the
    interval (a new Postgres backend) are counted from when they are first seen."""

    def __init__(self, groups: dict[str, list[int]], postmaster: int | None = None) -> None:
        self.groups = groups
        self.postmaster = postmaster
        self._before: dict[int, float] = {}
        self.used: dict[str, float] = {}

    def _pids(self) -> dict[str, list[int]]:
        pids = dict(self.groups)
        if self.postmaster is not None:
            pids["postgres"] = [self.postmaster, *children(self.postmaster)]
        return pids

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) for ps in self._pids().values() for pid in ps}

    def stop(self) -> dict[str, float]:
        self.used = {
            name: sum(max(0.0, cpu_seconds(pid) - self._before.get(pid, 0.0)) for pid in ps)
            for name, ps in self._pids().items()
        }
        return self.used
