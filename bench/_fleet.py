"""Worker fleets in subprocesses, each in its own process group, with their peak memory.

``pipeline worker`` is started exactly as an operator starts it (the Dramatiq CLI on
``actors.worker``); a baseline fleet runs ``dramatiq MODULE`` with the same process and thread
counts. Peak RSS is the kernel's own high-water mark (``VmHWM`` in ``/proc/PID/status``) of
each process of the tree, sampled until the fleet stops — exact for every process alive at
a sample, whatever happened between samples.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench._stack import ROOT, stop_process_group

SAMPLE_INTERVAL_S = 0.1


def _status_kib(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


@dataclass
class MemoryPeak:
    """Peak RSS in MB (10⁶ bytes): of the largest single process, and of the whole tree at one sample."""

    process_mb: float = 0.0
    tree_mb: float = 0.0


@dataclass
class Fleet:
    """A running worker command; ``peak`` follows its process tree's memory until it stops."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    peak: MemoryPeak = field(default_factory=MemoryPeak)
    _stop: threading.Event = field(default_factory=threading.Event)
    _hwm_kib: dict[int, int] = field(default_factory=dict)

    def _tree(self) -> list[int]:
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        tree_kib = 0
        for pid in self._tree():
            hwm = _status_kib(pid, "VmHWM")
            self._hwm_kib[pid] = max(self._hwm_kib.get(pid, 0), hwm)
            tree_kib += _status_kib(pid, "VmRSS")
        self.peak.process_mb = max(self._hwm_kib.values(), default=0) * 1024 / 1e6
        self.peak.tree_mb = max(self.peak.tree_mb, tree_kib * 1024 / 1e6)

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def fleet(name: str, command: list[str], env: dict[str, str], log_path: Path) -> Iterator[Fleet]:
    """Run ``command`` (a worker CLI) in its own process group until the block exits."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Fleet(name=name, process=process, log_path=log_path)
    watcher = threading.Thread(target=running._watch, name=f"rss-{name}", daemon=True)
    watcher.start()
    try:
        yield running
        running.sample()
    finally:
        running._stop.set()
        watcher.join(timeout=5)
        stop_process_group(process, grace_s=30)


def pipeline_worker_command(processes: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "worker", "--processes", str(processes), "--threads", str(threads)]


def dramatiq_command(module: str, processes: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "dramatiq", module, "--processes", str(processes), "--threads", str(threads)]
