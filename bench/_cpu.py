"""Where the CPU goes during a timed window: the worker fleet, the PostgreSQL backends serving the
bench database, the S3 server, RabbitMQ, and everything else on the machine.

On a 2-core box the services and the workers share the same cores, so CPU per task tells
more than wall time: it shows which component a faster pipeline would have to spend less in,
and how much of the machine other work took meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

Selector = Callable[[], list[psutil.Process]]


def tree(pid: int) -> Selector:
    def select() -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    return select


def matching(name: str, *, cmdline_contains: str | None = None) -> Selector:
    def select() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["name", "cmdline"]):
            if process.info["name"] != name and not (process.info["cmdline"] or [""])[0].endswith(name):
                continue
            if cmdline_contains and cmdline_contains not in " ".join(process.info["cmdline"] or []):
                continue
            found.append(process)
        return found

    return select


def _cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


@dataclass
class CpuWindow:
    """CPU seconds each group used between ``start()`` and ``stop()``, and the machine's total."""

    groups: dict[str, Selector]
    used: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    machine_s: float = 0.0
    _before: dict[str, dict[int, float]] = field(default_factory=dict)
    _machine_before: float = 0.0
    _started: float = 0.0

    def start(self) -> CpuWindow:
        self._before = {name: _cpu_seconds(select()) for name, select in self.groups.items()}
        self._machine_before = _machine_busy()
        self._started = time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        self.wall_s = time.perf_counter() - self._started
        self.machine_s = _machine_busy() - self._machine_before
        for name, select in self.groups.items():
            after = _cpu_seconds(select())
            before = self._before.get(name, {})
            self.used[name] = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
        return self

    def own_ms_per_task(self, tasks: int) -> float:
        """CPU ms per task of the measured groups together (the rest of the machine left out)."""
        return 1000 * sum(self.used.values()) / tasks

    def per_task_ms(self, tasks: int) -> str:
        parts = [f"{name} {1000 * seconds / tasks:.1f}" for name, seconds in self.used.items()]
        other = self.machine_s - sum(self.used.values())
        parts.append(f"rest of the machine {1000 * max(other, 0.0) / tasks:.1f}")
        return "CPU ms per task: " + ", ".join(parts)

    def describe(self, tasks: int) -> str:
        cores = psutil.cpu_count() or 1
        busy = 100 * self.machine_s / (self.wall_s * cores) if self.wall_s else 0.0
        return f"{self.per_task_ms(tasks)} (machine {busy:.0f}% busy over {self.wall_s:.1f} s)"


def _machine_busy() -> float:
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, name, 0.0) for name in busy))
