"""Defect 8: rate-limit waits and HTTP requests are bounded by the attempt's lease deadline,
and a request's timeout is its total time, not the time of each I/O operation."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from connectors.rest.config import RetryConfig
from connectors.rest.http import HttpClient
from connectors.rest.ratelimit import LocalRateLimiter
from errors import DeadlineExceeded, UpstreamError
from tests.connectors.support import LOOPBACK


def test_a_rate_limit_slot_past_the_deadline_raises_at_once_instead_of_sleeping() -> None:
    limiter = LocalRateLimiter(margin=0)
    limiter.acquire("https://api.example.com", 0.1)  # the next slot is 10 s away
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="past the attempt's deadline"):
        limiter.acquire("https://api.example.com", 0.1, deadline=time.monotonic() + 1)
    # Sleeping for the slot would take 10 s; half of that is a bound no loaded machine reaches.
    assert time.monotonic() - started < 5


@pytest.fixture
def slow_drip() -> Iterator[str]:
    """An upstream that sends headers at once, then one body byte every 0.2 s for 30 s."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 150\r\n\r\n")
                for _ in range(150):
                    if stop.wait(0.2):
                        break
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


def test_a_slow_drip_response_is_cut_off_at_the_requests_total_timeout(slow_drip: str) -> None:
    client = HttpClient(slow_drip, timeout_s=1.0, retry=RetryConfig(max_attempts=1), network=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="took longer than the request's total time"):
        client.get(f"{slow_drip}/items")
    elapsed = time.monotonic() - started
    client.close()
    assert elapsed < 5, f"a 1 s request ran {elapsed:.1f}s (each byte arrived within the per-I/O timeout)"


def test_a_request_never_runs_past_the_lease_deadline(slow_drip: str) -> None:
    client = HttpClient(slow_drip, timeout_s=30.0, retry=RetryConfig(max_attempts=1), network=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(UpstreamError):
        client.get(f"{slow_drip}/items", hard_deadline=time.monotonic() + 1.0)
    client.close()
    assert time.monotonic() - started < 5
