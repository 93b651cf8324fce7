"""HTTP for the REST and GraphQL connectors: timeouts, retries with backoff, ``Retry-After`` and a shared rate limit.

Retries are ``tenacity``'s: the retry predicate is "the attempt raised ``_Retryable``" (a
transport error, 429 or 5xx, classified where the response is read), the wait is the
upstream's ``Retry-After`` when it sent one and full-jitter exponential backoff otherwise, and
the stop is bound to the caller's deadline: no wait may end past it, nor push the total wait
past ``retry.max_wait_s``, nor follow the last of ``retry.max_attempts``.

Every connection goes through the SSRF guard (``connectors.net.GuardedTransport``) and every
body is streamed under ``PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES``.
"""

from __future__ import annotations

import functools
import math
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import httpx
import tenacity

from connectors.base import RateLimiter
from connectors.net import GuardedTransport, NetworkPolicy
from connectors.rest.config import ParamValue, RetryConfig
from errors import UpstreamError

EXCERPT_CHARS = 200
CAP_SETTING = "PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES"
# Headers describing the wire form of a body that is handed on already decoded.
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date); ``None`` if unusable.

    Neither tenacity nor httpx parses this header; the HTTP-date form is the standard library's.
    """
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


def retryable_status(status: int) -> bool:
    """Whether another attempt may get a different answer: 429 and 5xx."""
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


# Errors raised before the request reached the upstream: safe to retry even a non-idempotent POST.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _Retryable(Exception):
    """One failed attempt that another may fix; only ever seen by the retry loop."""

    def __init__(self, problem: str, *, status: int | None, retry_after: float | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.status = status
        self.retry_after = retry_after


@dataclass
class _Stop:
    """Tenacity stop condition that also remembers why it stopped, for the error message."""

    retry: RetryConfig
    deadline: float | None
    reason: str = ""

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.retry.max_attempts:
            self.reason = f"gave up after {state.attempt_number} attempts"
            return True
        delay = state.upcoming_sleep
        over_deadline = self.deadline is not None and time.monotonic() + delay > self.deadline
        if over_deadline or state.idle_for + delay > self.retry.max_wait_s:
            limit = "the time budget" if over_deadline else f"retry.max_wait_s ({self.retry.max_wait_s:g}s)"
            failure = _failure(state)
            source = "Retry-After" if failure is not None and failure.retry_after is not None else "backoff"
            self.reason = (
                f"gave up after {state.attempt_number} attempts: "
                f"waiting {delay:.1f}s more ({source}) would exceed {limit}"
            )
            return True
        return False


def _failure(state: tenacity.RetryCallState) -> _Retryable | None:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc if isinstance(exc, _Retryable) else None


class HttpClient:
    """Requests to one upstream with retries, backoff and a rate limit.

    Parameters:
        base_url: the upstream; also the rate limiter's key, so every company on one upstream
            shares its limit.
        timeout_s: connect, read, write and pool timeout of each request.
        retry: attempts and waits (see ``RetryConfig``).
        auth: adds credentials to each request (``connectors.rest.connector.EnvAuth``,
            ``connectors.oauth2.OAuth2Auth``).
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
        # Hooks, so that requests an auth flow sends itself (the retry after a token refresh)
        # are counted and their responses reach the metrics too.
        self._client.event_hooks = {"request": [self._before_send], "response": [self._on_response]}

    def backoff(self, retry_number: int) -> float:
        """Exponential backoff with full jitter for the ``retry_number``-th retry (1-based)."""
        ceiling = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** (retry_number - 1))
        return self._random.uniform(0, ceiling)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        failure = _failure(state)
        if failure is not None and failure.retry_after is not None:
            return failure.retry_after
        return self.backoff(state.attempt_number)

    def _before_send(self, request: httpx.Request) -> None:
        """httpx's request hook, called for every request just before it goes to the transport.

        The rate-limit slot is taken here, not once per ``request`` call: a request an auth flow
        re-sends itself (after a token refresh) takes a slot of its own, and the wait ends as
        close to the wire as httpx allows. The request's total time starts after the wait.
        """
        if self.limiter is not None and self.requests_per_second:
            hard_deadline = request.extensions.get("hard_deadline")
            self.limiter.acquire(self.base_url, self.requests_per_second, deadline=hard_deadline)
            total = self.timeout_s
            if hard_deadline is not None:
                total = max(0.1, min(total, hard_deadline - time.monotonic()))
            request.extensions["timeout"] = httpx.Timeout(total).as_dict()
            request.extensions["total_deadline"] = time.monotonic() + total
        self.requests_sent += 1

    def _on_response(self, response: httpx.Response) -> None:
        if self.on_response is not None:
            self.on_response(response.status_code)

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
        return self.request("GET", url, params=params, deadline=deadline, hard_deadline=hard_deadline)

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, ParamValue] | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        deadline: float | None = None,
        hard_deadline: float | None = None,
        idempotent: bool = True,
        auth: httpx.Auth | None = None,
        ok_statuses: frozenset[int] = frozenset(),
        retry_response: Callable[[httpx.Response], str | None] | None = None,
    ) -> httpx.Response:
        """Send one request with the retries of ``get``.

        Parameters:
            json, data: a JSON or form body (GraphQL queries, OAuth2 token requests).
            idempotent: ``False`` for a request that must not be repeated once the upstream may
                have acted on it (a rotating refresh-token grant): only failures before the
                request was sent, and 429, are retried.
            auth: overrides the client's auth for this request.
            ok_statuses: statuses returned like a 2xx instead of raised (an OAuth2 error body
                to read).
            retry_response: says why a 2xx response must be retried like a 429 (a GraphQL
                ``errors`` array saying the query was throttled), or ``None``.

        Raises:
            UpstreamError: as for ``get``.
        """
        path = httpx.URL(url).path
        stop = _Stop(self.retry, deadline)

        def attempt() -> httpx.Response:
            # Each request gets timeout_s in total (not per I/O), and never runs past the lease
            # (recomputed after the rate-limit wait, in _before_send).
            total = self.timeout_s
            if hard_deadline is not None:
                total = max(0.1, min(total, hard_deadline - time.monotonic()))
            try:
                # httpx replaces the query of `url` with `params`, even an empty one (Link URLs).
                request = self._client.build_request(
                    method, url, params=dict(params) if params else None, json=json, data=data, timeout=total,
                    extensions={"total_deadline": time.monotonic() + total, "hard_deadline": hard_deadline},
                )
                response = self._send(request, auth)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if not idempotent and not isinstance(exc, _UNSENT):
                    raise UpstreamError(f"{method} {path}: {problem}", retryable=True) from exc
                raise _Retryable(problem, status=None, retry_after=None) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            status = response.status_code
            if status < 300 and retry_response is not None and (throttled := retry_response(response)):
                raise _Retryable(throttled, status=status, retry_after=parse_retry_after(
                    response.headers.get("Retry-After")))
            if status < 300 or status in ok_statuses:
                return response
            if not retryable_status(status):
                raise UpstreamError(self._describe(response), retryable=False, status=status)
            problem = f"HTTP {status}: {body_excerpt(response)}"
            if not idempotent and status != 429:
                raise UpstreamError(f"{method} {path}: {problem}", retryable=True, status=status)
            raise _Retryable(problem, status=status, retry_after=parse_retry_after(response.headers.get("Retry-After")))

        def give_up(state: tenacity.RetryCallState) -> NoReturn:
            failure = _failure(state)
            assert failure is not None  # the predicate retries nothing else
            raise UpstreamError(
                f"{method} {path}: {failure.problem} ({stop.reason})", retryable=True, status=failure.status
            ) from failure.__cause__

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            wait=self._wait,
            stop=stop,
            retry_error_callback=give_up,
            sleep=time.sleep,
        )
        response: httpx.Response = retrying(attempt)
        return response

    def _send(self, request: httpx.Request, auth: httpx.Auth | None) -> httpx.Response:
        """Send ``request`` (its total time bounded by its ``total_deadline``), its body read under
        the cap; the response returned holds the decoded body."""
        cap = self.max_response_bytes
        response = self._client.send(request, stream=True, auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT)
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
                f"{request.method} {request.url.path}: HTTP {response.status_code}: the response body is larger than "
                f"{CAP_SETTING} ({cap} bytes = {_mib(cap)}); fetch smaller pages (the paginator's limit)",
                retryable=False, status=response.status_code,
            )
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _WIRE_HEADERS]
        # The request that got this response (an auth flow may have re-sent it with another token).
        return httpx.Response(response.status_code, headers=headers, content=b"".join(parts),
                              request=response.request)

    @staticmethod
    def _describe(response: httpx.Response) -> str:
        method, path = response.request.method, response.request.url.path
        if 300 <= response.status_code < 400:
            location = response.headers.get("Location", "?")
            return (f"{method} {path}: HTTP {response.status_code} redirect to {printable_excerpt(location)} "
                    "(redirects are not followed)")
        return f"{method} {path}: HTTP {response.status_code}: {body_excerpt(response)}"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
