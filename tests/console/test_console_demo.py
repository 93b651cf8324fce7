"""``pipeline demo --serve``: the console on the embedded default (SQLite, in-process broker,
local blobs) on a fresh machine — it prints its URL and an admin key, and a sync started from
the console runs to completion in the API process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.services import free_port, wait_for


def test_demo_serve_prints_the_console_url_and_a_sync_started_there_completes(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "demo", "--directory", str(tmp_path / "demo"), "--serve",
         "--port", str(port)],
        env={**env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        printed: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while "admin key" not in printed and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.match(r"^(console|admin key): (\S+)$", line.strip())
            if match:
                printed[match.group(1)] = match.group(2)
        assert printed.get("console") == f"http://127.0.0.1:{port}/console", printed
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=60, what="the demo server")
        with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as client:
            form = client.get("/console/login").text
            token = re.search(r'name="csrf" value="([^"]+)"', form)
            assert token
            client.post("/console/login", data={"csrf": token.group(1), "admin_key": printed["admin key"]})
            jobs = client.get("/console/jobs")
            assert jobs.status_code == 200 and jobs.text.count('class="job"') == 1, "the demo's own job"
            csrf = re.search(r'name="csrf" value="([^"]+)"', jobs.text)
            assert csrf
            started = client.post("/console/companies/1/sync", data={"csrf": csrf.group(1)})
            job_url = str(started.url)
            assert re.search(r"/console/jobs/[0-9a-f-]{36}", job_url), job_url
            wait_for(lambda: "completed: " in client.get(job_url).text, timeout=120, what="the console's sync")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
