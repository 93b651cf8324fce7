"""Defect 8: rate-limit waits and HTTP requests are bounded by the attempt's lease deadline,
and a request's timeout is its total time, not the time of each I/O operation."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from connectors.rest.config import RetryConfig
from connectors.rest.http import HttpClient
from connectors.rest.ratelimit import LocalRateLimiter
from errors import DeadlineExceeded, UpstreamError
from tests.connectors.support import LOOPBACK
from tests.services import wait_for


def test_a_rate_limit_slot_past_the_deadline_raises_at_once_instead_of_sleeping() -> None:
    limiter = LocalRateLimiter(margin=0)
    limiter.acquire("https://api.example.com", 0.1)  # the next slot is 10 s away
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="past the attempt's deadline"):
        limiter.acquire("https://api.example.com", 0.1, deadline=time.monotonic() + 1)
    # Sleeping for the slot would take 10 s; half of that is a bound no loaded machine reaches.
    assert time.monotonic() - started < 5


@dataclass
class Drip:
    """The slow-drip upstream: its URL, and how many body bytes each connection got before the
    client hung up (``None`` while it is still being served, 150 when it got the whole body)."""

    url: str
    served: list[int | None] = field(default_factory=list)


@pytest.fixture
def slow_drip() -> Iterator[Drip]:
    """An upstream that sends headers at once, then one body byte every 0.2 s for 30 s."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    drip = Drip(f"http://127.0.0.1:{server.getsockname()[1]}")

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            drip.served.append(None)
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 150\r\n\r\n")
                sent = 0
                while sent < 150 and not stop.wait(0.2):
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break  # the client hung up (the kernel may have taken a byte or two after)
                    sent += 1
                drip.served[-1] = sent

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield drip
    stop.set()
    thread.join(5)
    server.close()


def cut_short(drip: Drip) -> int:
    """Wait until the server notices the client hung up; the body bytes it had sent by then."""
    wait_for(lambda: bool(drip.served) and drip.served[-1] is not None, timeout=60,
             what="the slow-drip server to notice the client hung up")
    sent = drip.served[-1]
    assert sent is not None
    return sent


def test_a_slow_drip_response_is_cut_off_at_the_requests_total_timeout(slow_drip: Drip) -> None:
    client = HttpClient(slow_drip.url, timeout_s=1.0, retry=RetryConfig(max_attempts=1), network=LOOPBACK)
    with pytest.raises(UpstreamError, match="took longer than the request's total time"):
        client.get(f"{slow_drip.url}/items")
    client.close()
    # Load-independent: each byte arrives within the per-I/O timeout, so only the total time cuts
    # the response; the server saw the client hang up before the body was complete.
    assert cut_short(slow_drip) < 150


def test_a_request_never_runs_past_the_lease_deadline(slow_drip: Drip) -> None:
    client = HttpClient(slow_drip.url, timeout_s=30.0, retry=RetryConfig(max_attempts=1), network=LOOPBACK)
    with pytest.raises(UpstreamError):
        client.get(f"{slow_drip.url}/items", hard_deadline=time.monotonic() + 1.0)
    client.close()
    # The request's own 30 s would let the whole body through; the deadline cut it short.
    assert cut_short(slow_drip) < 150
