"""Sampling profiles of running worker fleets with py-spy, summarised as top frames.

``py-spy`` (PyPI) is optional: ``--profile`` asks for it, and says so clearly when it is missing.
The summary counts, for each function, the share of samples whose stack contains it
(inclusive time), which is what tells where a task's time goes.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^()]+?)(?::\d+)?\)$")
OURS = ("pipeline/", "connectors/", "storage/", "actors/", "bench/")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


@contextlib.contextmanager
def recording(pid: int, output: Path, *, rate: int = 250) -> Iterator[None]:
    """Record the process tree of ``pid`` until the block exits: only threads holding the GIL
    (``--gil``), so the samples are where Python spends CPU, not where threads wait on a socket
    (py-spy's idle detection counted psycopg's and pika's waits as busy)."""
    process = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil", "--rate", str(rate),
         "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.rsplit("/main/", 1)[-1]
    return f"{match.group('function')} ({path})"


def summarize(raw: Path, *, top: int = 25, ours_only: bool = False) -> str:
    """Top functions by inclusive share of samples, from py-spy's ``raw`` (collapsed) output."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = {_short(frame) for frame in stack.split(";")[1:]}  # the first frame is the process
        for frame in frames:
            inclusive[frame] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (threads holding the GIL)"]
    shown = 0
    for frame, count in inclusive.most_common():
        if ours_only and not any(part in frame for part in OURS):
            continue
        if frame.startswith(("_bootstrap", "run (threading", "<module>", "_bootstrap_inner")):
            continue
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)
