"""CPU seconds used by this process and everything it started, for per-core throughput figures.

Wall-clock rates divided by a worker count say little on a shared machine: other jobs, the S3 server
and idle workers all skew them. CPU seconds consumed by the work itself do not. ``CpuClock`` sums
this process, its live descendants (Ray's raylet and workers, DataLoader workers) and its reaped
children, leaving out processes named in ``exclude`` (the S3 server, whose work is storage).
"""

from __future__ import annotations

import os

import psutil


class CpuClock:
    def __init__(self, exclude: tuple[int, ...] = ()):
        self.exclude = set(exclude)

    def now(self) -> float:
        me = psutil.Process()
        total = sum(me.cpu_times()[:2])
        for child in me.children(recursive=True):
            if child.pid in self.exclude:
                continue
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                continue
        times = os.times()
        return total + times.children_user + times.children_system
