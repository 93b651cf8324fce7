"""HTTP for the REST connector: timeouts, retries with backoff, ``Retry-After`` and a shared rate limit.

Every connection goes through the SSRF guard (``connectors.net.GuardedTransport``) and every
body is streamed under ``PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES``.

Retries are a short loop rather than a retry library: the wait honours ``Retry-After``, the stop
depends on the caller's deadline and the decision depends on the response status, so every part
of a generic retrier would have been replaced.
"""

from __future__ import annotations

import functools
import math
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from connectors.base import RateLimiter
from connectors.net import GuardedTransport, NetworkPolicy
from connectors.rest.config import ParamValue, RetryConfig
from errors import UpstreamError

EXCERPT_CHARS = 200
CAP_SETTING = "PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES"
# Headers describing the wire form of a body that is handed on already decoded.
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date); ``None`` if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def printable_excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``text``, printable ones only, whitespace collapsed: what
    may go from an upstream's answer into an error message (no control or bidi characters)."""
    text = "".join(char if char.isprintable() else " " for char in text[: limit * 4])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def body_excerpt(response: httpx.Response) -> str:
    """The start of the body as a ``printable_excerpt``, for error messages."""
    try:
        text = response.content[: EXCERPT_CHARS * 4].decode(response.encoding or "utf-8", errors="replace")
    except (LookupError, httpx.HTTPError):
        return "<unreadable body>"
    return printable_excerpt(text)


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size} bytes"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes ~50 ms; connectors are built per chunk, so share one context.
    return httpx.create_ssl_context()


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class _TotalTimeStream(httpx.SyncByteStream):
    """A response body that stops once the request's total time is up (httpx's timeouts are
    per I/O operation, so a slow-drip body could otherwise run past the deadline: defect 8)."""

    def __init__(self, stream: httpx.SyncByteStream, deadline: float, request: httpx.Request) -> None:
        self._stream = stream
        self._deadline = deadline
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout("the response took longer than the request's total time", request=self._request)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class _TotalTimeTransport(httpx.BaseTransport):
    """Bounds the whole exchange by ``request.extensions["total_deadline"]`` (a monotonic time)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        deadline = request.extensions.get("total_deadline")
        if deadline is not None and isinstance(response.stream, httpx.SyncByteStream):
            response.stream = _TotalTimeStream(response.stream, deadline, request)
        return response

    def close(self) -> None:
        self._inner.close()


class HttpClient:
    """GET requests to one upstream with retries, backoff and a rate limit.

    Parameters:
        base_url: the upstream; also the rate limiter's key, so every company on one upstream
            shares its limit.
        timeout_s: connect, read, write and pool timeout of each request.
        retry: attempts and waits (see ``RetryConfig``).
        auth: adds credentials to each request (``connectors.rest.connector.EnvAuth``).
        limiter: spaces requests across processes; used only with ``requests_per_second``.
        on_response: called with the status of every response received (retries included),
            e.g. to count requests per status in metrics.
        network: where connections may go and the cap on each body (``connectors.net``);
            default: public addresses only, 64 MiB.

    ``requests_sent`` counts every request sent, retries included.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        retry: RetryConfig,
        auth: httpx.Auth | None = None,
        limiter: RateLimiter | None = None,
        requests_per_second: float | None = None,
        on_response: Callable[[int], None] | None = None,
        network: NetworkPolicy | None = None,
    ) -> None:
        network = network or NetworkPolicy()
        self.max_response_bytes = network.max_response_bytes
        self.base_url = base_url
        self.retry = retry
        self.limiter = limiter
        self.requests_per_second = requests_per_second
        self.on_response = on_response
        self.timeout_s = timeout_s
        self.requests_sent = 0
        self._random = random.Random()
        # Redirects are not followed: a cross-origin redirect would carry custom auth headers along.
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            transport=_TotalTimeTransport(GuardedTransport(network, verify=_tls_context())),
            trust_env=False,
            auth=auth,
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": "sync-pipeline-rest-connector"},
        )

    def backoff(self, retry_number: int) -> float:
        """Exponential backoff with full jitter for the ``retry_number``-th retry (1-based)."""
        ceiling = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** (retry_number - 1))
        return self._random.uniform(0, ceiling)

    def get(
        self, url: str, *, params: Mapping[str, ParamValue] | None = None, deadline: float | None = None,
        hard_deadline: float | None = None,
    ) -> httpx.Response:
        """GET ``url``, retrying connection errors, timeouts, 429 and 5xx.

        Parameters:
            deadline: a ``time.monotonic()`` value no retry wait may run past.
            hard_deadline: a ``time.monotonic()`` value no rate-limit wait and no request may
                run past (the lease); each request also gets at most ``timeout_s`` in total.

        Returns:
            A 2xx response.

        Raises:
            UpstreamError: ``retryable=False`` with the status and a body excerpt for any other
                4xx or a redirect; ``retryable=True`` (with the last status, if any) once the
                attempts, the total wait or the deadline are used up.
        """
        path = httpx.URL(url).path
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            if self.limiter is not None and self.requests_per_second:
                self.limiter.acquire(self.base_url, self.requests_per_second, deadline=hard_deadline)
            self.requests_sent += 1
            status: int | None = None
            retry_after: float | None = None
            # Each request gets timeout_s in total (not per I/O), and never runs past the lease.
            total = self.timeout_s
            if hard_deadline is not None:
                total = max(0.1, min(total, hard_deadline - time.monotonic()))
            try:
                response = self._send(url, params, total)
            except httpx.TransportError as exc:
                failure: Exception | None = exc
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except httpx.HTTPError as exc:
                raise UpstreamError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
            else:
                failure = None
                status = response.status_code
                if self.on_response is not None:
                    self.on_response(status)
                if status < 300:
                    return response
                if not _retryable_status(status):
                    raise UpstreamError(self._describe(response), retryable=False, status=status)
                problem = f"HTTP {status}: {body_excerpt(response)}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))

            if attempts >= self.retry.max_attempts:
                raise UpstreamError(
                    f"GET {path}: {problem} (gave up after {attempts} attempts)",
                    retryable=True,
                    status=status,
                ) from failure
            delay = retry_after if retry_after is not None else self.backoff(attempts)
            over_deadline = deadline is not None and time.monotonic() + delay > deadline
            if over_deadline or waited + delay > self.retry.max_wait_s:
                limit = "the time budget" if over_deadline else f"retry.max_wait_s ({self.retry.max_wait_s:g}s)"
                source = "Retry-After" if retry_after is not None else "backoff"
                raise UpstreamError(
                    f"GET {path}: {problem} (gave up after {attempts} attempts: "
                    f"waiting {delay:.1f}s more ({source}) would exceed {limit})",
                    retryable=True,
                    status=status,
                ) from failure
            time.sleep(delay)
            waited += delay

    def _send(self, url: str, params: Mapping[str, ParamValue] | None, total: float) -> httpx.Response:
        """One GET taking at most ``total`` seconds, its body read under the cap; the response
        returned holds the decoded body."""
        # httpx replaces the query of `url` with `params`, even an empty one (Link URLs).
        request = self._client.build_request("GET", url, params=dict(params) if params else None, timeout=total,
                                             extensions={"total_deadline": time.monotonic() + total})
        cap = self.max_response_bytes
        response = self._client.send(request, stream=True)
        try:
            declared = response.headers.get("Content-Length", "")
            too_big = declared.isdigit() and int(declared) > cap
            parts: list[bytes] = []
            size = 0
            if not too_big:
                for part in response.iter_bytes():
                    size += len(part)
                    if size > cap:
                        too_big = True
                        break
                    parts.append(part)
        finally:
            response.close()
        if too_big:
            parts.clear()
            raise UpstreamError(
                f"GET {request.url.path}: HTTP {response.status_code}: the response body is larger than "
                f"{CAP_SETTING} ({cap} bytes = {_mib(cap)}); fetch smaller pages (the paginator's limit)",
                retryable=False, status=response.status_code,
            )
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _WIRE_HEADERS]
        return httpx.Response(response.status_code, headers=headers, content=b"".join(parts), request=request)

    @staticmethod
    def _describe(response: httpx.Response) -> str:
        path = response.request.url.path
        if 300 <= response.status_code < 400:
            location = response.headers.get("Location", "?")
            return (f"GET {path}: HTTP {response.status_code} redirect to {printable_excerpt(location)} "
                    "(redirects are not followed)")
        return f"GET {path}: HTTP {response.status_code}: {body_excerpt(response)}"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
