"""Fake upstream APIs: real HTTP servers on 127.0.0.1 that behave like the APIs they stand for.

- ``ScheduleApi``: a field-service schedule API (ASP.NET style): ``GET /api/dr-schedule`` with
  ``startDate``, ``endDate``, ``page``, ``pageSize`` and the ``IsSuccess``/``Result``/``Message``
  envelope; ``GET /api/dr-schedule/users``. Jobs are the synthetic connector's records.
- ``StripeApi``: ``GET /v1/customers`` (``data``, ``has_more``, ``starting_after``, ``limit``) and
  ``GET /v1/customers/search`` (``next_page`` token sent back as ``page``).
- ``CloseApi``: ``GET /api/v1/lead/`` with ``_skip``/``_limit``, ``data``, ``has_more``.
- ``LinkApi``: ``GET /items`` with ``page``/``per_page``, a JSON list body and RFC 8288
  ``Link: <...>; rel="next"`` headers (GitHub style).

Every record has an ``updated_at`` (ISO 8601, UTC); ``updated_since`` returns only records
updated strictly after it, and ``touch`` changes records between syncs. ``fail_next`` makes the
next requests fail; ``requests`` is the log of every request served, failures included.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from connectors.base import FetchRequest, Record
from connectors.synthetic import SyntheticConnector

if TYPE_CHECKING:
    from tests.fakes.oauth2 import OAuth2Provider

FaultKind = Literal[
    "rate_limit", "server_error", "unauthorized", "not_success", "malformed", "graphql_errors", "throttled"
]
MalformedVariant = Literal["missing", "not_list", "not_json"]

BASE_UPDATED_AT = datetime(2024, 1, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """One request as the fake saw it; ``at`` is ``time.monotonic()`` on arrival.

    ``sent_at`` is when its first bytes reached this host's kernel (``time.time()``, from the
    socket's receive timestamp): on loopback that is when the client wrote them, whatever
    this process's threads were doing, so it measures the client's send times.
    """

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    at: float
    status: int
    body: bytes = b""
    sent_at: float | None = None

    def json(self) -> Any:
        """The request body, decoded as JSON."""
        return json.loads(self.body)


@dataclass(slots=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = "application/json; charset=utf-8"


@dataclass(slots=True)
class _Fault:
    kind: FaultKind
    remaining: int
    retry_after: float
    http_date: bool
    message: str
    variant: MalformedVariant
    skip: int


class BadRequest(Exception):
    """Raised by a route for invalid parameters; becomes the API's own 400 answer."""


# Linux's SO_TIMESTAMPNS (not exported by the socket module on every Python).
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeUpstream

    def server_bind(self) -> None:
        # On the listening socket, so that accepted ones inherit it before their first bytes arrive.
        self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections end on their own, so no thread outlives a test for long.
    timeout = 5
    # Headers and body go out in two writes; with Nagle on, each response waits for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.sent_at: float | None = None

    def handle_one_request(self) -> None:
        # Peek at the next request's bytes before reading them: the kernel stamps their arrival.
        # A keep-alive client sends one request at a time, so the newest data queued is its own.
        try:
            _, ancillary, _, _ = self.connection.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
        except OSError:
            self.close_connection = True
            return
        self.sent_at = None
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", data[:16])
                self.sent_at = seconds + nanoseconds / 1e9
        super().handle_one_request()

    def do_GET(self) -> None:
        self.server.fake.serve(self)

    def do_POST(self) -> None:
        self.server.fake.serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeUpstream:
    """Base of the fakes: the server, the request log, fault injection and record changes.

    Subclasses set ``primary_key`` and implement ``route`` and the ``_error_body`` /
    ``_malformed_body`` answers in their API's own style.
    """

    primary_key: ClassVar[str] = "id"
    supports_envelope: ClassVar[bool] = False

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._log: list[ServedRequest] = []
        self._faults: deque[_Fault] = deque()
        self._changes: dict[Any, dict[str, Any]] = {}
        self._touches = 0
        self._required_header: tuple[str, str] | None = None
        self._authorizer: Callable[[dict[str, str]], bool] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        # A short poll interval keeps shutdown() (which waits for the next poll) fast.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- control ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[ServedRequest]:
        """Every request served so far, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def fail_next(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        retry_after: float = 1.0,
        http_date: bool = False,
        message: str = "Something went wrong upstream",
        variant: MalformedVariant = "missing",
        after: int = 0,
    ) -> None:
        """Answer ``count`` requests with a failure, once ``after`` more requests were served normally.

        Faults queue up: this one starts after those already queued are used.

        ``rate_limit``: 429 with ``Retry-After`` in seconds, or with ``http_date`` as an HTTP
        date at least ``retry_after`` seconds ahead. ``server_error``: 500. ``unauthorized``:
        401. ``not_success``: HTTP 200 with ``IsSuccess: false`` and ``message`` (envelope APIs
        only). ``malformed``: HTTP 200 whose records are ``missing``, ``not_list``, or a body
        that is ``not_json``.
        """
        if kind == "not_success" and not self.supports_envelope:
            raise ValueError(f"{type(self).__name__} has no success envelope")
        with self._lock:
            self._faults.append(_Fault(kind, count, retry_after, http_date, message, variant, after))

    def require_header(self, name: str, value: str) -> None:
        """Answer 401 to requests without header ``name: value`` (e.g. a bearer token)."""
        with self._lock:
            self._required_header = (name, value)

    def require_oauth(self, provider: OAuth2Provider) -> None:
        """Answer 401 (``invalid_token``) unless the bearer token is one ``provider`` issued and
        still accepts; each request served counts as one use of the token."""
        with self._lock:
            self._authorizer = provider.authorize

    def touch(self, keys: Iterable[Any], **changes: Any) -> str:
        """Change the records with these primary keys and bump their ``updated_at``; return it."""
        with self._lock:
            self._touches += 1
            updated_at = iso(BASE_UPDATED_AT + timedelta(days=1, seconds=self._touches))
            for key in keys:
                self._changes[key] = {**self._changes.get(key, {}), **changes, "updated_at": updated_at}
        return updated_at

    def clear_requests(self) -> None:
        """Forget the requests served so far (e.g. between two syncs)."""
        with self._lock:
            self._log.clear()

    def reset(self, *, count: int | None = None) -> None:
        """Forget the log, pending faults, record changes and auth; optionally resize the dataset."""
        with self._lock:
            self._log.clear()
            self._faults.clear()
            self._changes.clear()
            self._touches = 0
            self._required_header = None
            if count is not None:
                self.count = count

    # -- serving ---------------------------------------------------------------------------

    def _apply_changes(self, records: list[Record]) -> list[Record]:
        with self._lock:
            changes = dict(self._changes)
        return [{**record, **changes.get(record[self.primary_key], {})} for record in records]

    @staticmethod
    def _updated_since(records: list[Record], params: dict[str, str]) -> list[Record]:
        since = params.get("updated_since")
        if since is None:
            return records
        return [record for record in records if record["updated_at"] > since]

    @staticmethod
    def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
        raw = params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
        return value

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            if fault.skip > 0:
                fault.skip -= 1
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.popleft()
            return fault

    def _fault_reply(self, fault: _Fault) -> Reply:
        if fault.kind == "rate_limit":
            if fault.http_date:
                when = datetime.fromtimestamp(math.ceil(time.time() + fault.retry_after), UTC)
                retry_after = format_datetime(when, usegmt=True)
            else:
                retry_after = f"{fault.retry_after:g}"
            return Reply(429, self._error_body(429, "Too many requests"), {"Retry-After": retry_after})
        if fault.kind == "server_error":
            return Reply(500, self._error_body(500, "An error has occurred."))
        if fault.kind == "unauthorized":
            return Reply(401, self._error_body(401, "Authorization has been denied for this request."))
        if fault.kind == "not_success":
            return Reply(200, {"IsSuccess": False, "Result": None, "Message": fault.message})
        if fault.variant == "not_json":
            return Reply(200, None, raw=b"<html><body>Service Unavailable</body></html>", content_type="text/html")
        return Reply(200, self._malformed_body(fault.variant))

    def _authorized(self, headers: dict[str, str]) -> bool:
        with self._lock:
            required = self._required_header
            authorizer = self._authorizer
        if authorizer is not None and not authorizer(headers):
            return False
        if required is None:
            return True
        sent = {name.lower(): value for name, value in headers.items()}
        return sent.get(required[0].lower()) == required[1]

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        url = urlsplit(handler.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = dict(handler.headers.items())
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.command not in self.methods:
            reply = Reply(405, self._error_body(405, "Method not allowed"))
        elif not self._authorized(headers):
            reply = Reply(401, self._error_body(401, "Authorization has been denied for this request."),
                          {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        elif (fault := self._next_fault()) is not None:
            reply = self._fault_reply(fault)
        else:
            try:
                reply = self.handle(handler.command, url.path, params, body, headers)
            except BadRequest as exc:
                reply = Reply(400, self._error_body(400, str(exc)))
        with self._lock:
            self._log.append(ServedRequest(handler.command, url.path, params, headers, arrived, reply.status, body,
                                           sent_at=getattr(handler, "sent_at", None)))
        payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)

    # -- per API ---------------------------------------------------------------------------

    methods: ClassVar[frozenset[str]] = frozenset({"GET"})

    def handle(self, method: str, path: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
        """Answer one authorized request; the default serves ``route`` (GET APIs)."""
        return self.route(path, params)

    def route(self, path: str, params: dict[str, str]) -> Reply:
        raise NotImplementedError

    def _error_body(self, status: int, message: str) -> Any:
        raise NotImplementedError

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        raise NotImplementedError


class ScheduleApi(FakeUpstream):
    """Field-service schedule API; ``count`` jobs per day, ``users`` employees."""

    primary_key = "JobInformationId"
    supports_envelope = True
    max_days = 31

    def __init__(self, count: int = 25, *, users: int = 20) -> None:
        super().__init__(count)
        self.users = users
        self._jobs_cache: dict[tuple[str, int], list[Record]] = {}

    def _generated_jobs(self, day: str) -> list[Record]:
        key = (day, self.count)
        if key not in self._jobs_cache:
            source = SyntheticConnector(
                {"jobs_per_day": self.count, "page_size": max(self.count, 1), "employees": self.users}
            )
            chunk = source.fetch(FetchRequest(company_id=1, external_id=None, resource="schedule", partition=day))
            self._jobs_cache[key] = [{**job, "updated_at": iso(BASE_UPDATED_AT)} for job in chunk.records]
        return self._jobs_cache[key]

    def jobs(self, day: str) -> list[Record]:
        """The jobs of ``day`` as the API currently serves them."""
        return self._apply_changes(self._generated_jobs(day))

    def employees(self) -> list[Record]:
        source = SyntheticConnector({"employees": self.users, "page_size": self.users})
        chunk = source.fetch(FetchRequest(company_id=1, external_id=None, resource="users", partition="all"))
        return [{**user, "updated_at": iso(BASE_UPDATED_AT)} for user in chunk.records]

    @staticmethod
    def _date(params: dict[str, str], name: str) -> date:
        if name not in params:
            raise BadRequest(f"The {name} field is required.")
        try:
            return date.fromisoformat(params[name])
        except ValueError:
            raise BadRequest(f"The value '{params[name]}' is not valid for {name}.") from None

    def route(self, path: str, params: dict[str, str]) -> Reply:
        if path == "/api/dr-schedule/users":
            return Reply(200, {"IsSuccess": True, "Result": self.employees(), "Message": None})
        if path != "/api/dr-schedule":
            return Reply(404, {"Message": f"No HTTP resource was found that matches the request URI '{path}'."})
        start, end = self._date(params, "startDate"), self._date(params, "endDate")
        if not 0 <= (end - start).days < self.max_days:
            raise BadRequest(f"endDate must be on or after startDate and within {self.max_days} days.")
        page = self._int_param(params, "page", 1, 1, 1_000_000)
        size = self._int_param(params, "pageSize", 50, 1, 500)
        jobs: list[Record] = []
        for offset in range((end - start).days + 1):
            jobs.extend(self.jobs((start + timedelta(days=offset)).isoformat()))
        jobs = self._updated_since(jobs, params)
        result = jobs[(page - 1) * size : page * size]
        return Reply(200, {"IsSuccess": True, "Result": result, "Message": None})

    def _error_body(self, status: int, message: str) -> Any:
        if status == 400:
            return {"IsSuccess": False, "Result": None, "Message": message}
        return {"Message": message}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        if variant == "not_list":
            return {
                "IsSuccess": True,
                "Result": "Object reference not set to an instance of an object.",
                "Message": None,
            }
        return {"IsSuccess": True, "Message": None}


class _ListApi(FakeUpstream):
    """A fake whose dataset is one list of ``count`` records made by ``make_record``."""

    def make_record(self, index: int) -> Record:
        raise NotImplementedError

    def records(self) -> list[Record]:
        """Every record as the API currently serves them, in its order."""
        base = [{**self.make_record(index), "updated_at": iso(BASE_UPDATED_AT)} for index in range(self.count)]
        return self._apply_changes(base)


def _customer(index: int) -> Record:
    return {
        "id": f"cus_{index:06d}",
        "object": "customer",
        "name": f"Customer {index}",
        "email": f"customer{index}@example.com",
        "created": 1_700_000_000 + index,
    }


class StripeApi(_ListApi):
    """Stripe-style list and search endpoints for customers."""

    def make_record(self, index: int) -> Record:
        return _customer(index)

    def route(self, path: str, params: dict[str, str]) -> Reply:
        if path == "/v1/customers":
            return self._list(params)
        if path == "/v1/customers/search":
            return self._search(params)
        return Reply(404, self._error_body(404, f"Unrecognized request URL (GET: {path})."))

    def _list(self, params: dict[str, str]) -> Reply:
        limit = self._int_param(params, "limit", 10, 1, 100)
        every = self.records()
        records = self._updated_since(every, params)
        after = params.get("starting_after")
        if after is not None:
            if all(record["id"] != after for record in every):
                raise BadRequest(f"No such customer: '{after}'")
            records = [record for record in records if record["id"] > after]
        page = records[:limit]
        body = {"object": "list", "url": "/v1/customers", "has_more": len(records) > limit, "data": page}
        return Reply(200, body)

    def _search(self, params: dict[str, str]) -> Reply:
        if not params.get("query"):
            raise BadRequest("Missing required param: query.")
        limit = self._int_param(params, "limit", 10, 1, 100)
        offset = 0
        if "page" in params:
            try:
                offset = int(base64.urlsafe_b64decode(params["page"].encode()).decode().removeprefix("offset:"))
            except ValueError:
                raise BadRequest(f"Invalid page: {params['page']!r}") from None
        records = self._updated_since(self.records(), params)
        page = records[offset : offset + limit]
        has_more = offset + limit < len(records)
        next_page = base64.urlsafe_b64encode(f"offset:{offset + limit}".encode()).decode() if has_more else None
        body = {
            "object": "search_result",
            "url": "/v1/customers/search",
            "has_more": has_more,
            "next_page": next_page,
            "data": page,
        }
        return Reply(200, body)

    def _error_body(self, status: int, message: str) -> Any:
        kind = "rate_limit_error" if status == 429 else "api_error" if status >= 500 else "invalid_request_error"
        return {"error": {"type": kind, "message": message}}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        if variant == "not_list":
            return {"object": "list", "url": "/v1/customers", "has_more": False, "data": {"id": "cus_000000"}}
        return {"object": "list", "url": "/v1/customers", "has_more": False}


def _lead(index: int) -> Record:
    return {"id": f"lead_{index:06d}", "display_name": f"Lead {index}", "status_label": "Potential"}


class CloseApi(_ListApi):
    """Close-style leads: ``_skip``/``_limit`` (capped at 200), ``data``, ``has_more``."""

    def make_record(self, index: int) -> Record:
        return _lead(index)

    def route(self, path: str, params: dict[str, str]) -> Reply:
        if path != "/api/v1/lead/":
            return Reply(404, self._error_body(404, "Not found"))
        skip = self._int_param(params, "_skip", 0, 0, 10_000_000)
        limit = min(self._int_param(params, "_limit", 100, 1, 10_000), 200)
        records = self._updated_since(self.records(), params)
        page = records[skip : skip + limit]
        body = {"has_more": skip + limit < len(records), "total_results": len(records), "data": page}
        return Reply(200, body)

    def _error_body(self, status: int, message: str) -> Any:
        return {"error": message}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        if variant == "not_list":
            return {"has_more": False, "data": "unavailable"}
        return {"has_more": False}


def _item(index: int) -> Record:
    return {"id": index + 1, "name": f"item {index + 1}"}


class LinkApi(_ListApi):
    """GitHub-style items: ``page``/``per_page``, a list body, ``Link`` headers with absolute URLs."""

    def make_record(self, index: int) -> Record:
        return _item(index)

    def route(self, path: str, params: dict[str, str]) -> Reply:
        if path != "/items":
            return Reply(404, self._error_body(404, "Not Found"))
        page = self._int_param(params, "page", 1, 1, 1_000_000)
        per_page = self._int_param(params, "per_page", 30, 1, 100)
        records = self._updated_since(self.records(), params)
        last = max(1, math.ceil(len(records) / per_page))
        links = []

        def link(target: int, rel: str) -> str:
            query = urlencode({**params, "page": target, "per_page": per_page})
            return f'<{self.base_url}{path}?{query}>; rel="{rel}"'

        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"Link": ", ".join(links)} if links else {}
        return Reply(200, records[(page - 1) * per_page : page * per_page], headers)

    def _error_body(self, status: int, message: str) -> Any:
        return {"message": message, "documentation_url": "https://docs.example.com/rest"}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        if variant == "not_list":
            return "items unavailable"
        return {"message": "Server Error"}


class _StreamingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _StreamingServer

    def do_GET(self) -> None:
        self.server.fake.serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _StreamingServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: BigPageApi

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped reading is the point
            super().handle_error(request, client_address)


class BigPageApi:
    """``GET /items``: one JSON list of ``size`` bytes (records of ~1 KiB), streamed with chunked
    transfer encoding — no ``Content-Length``, so a client learns the size only by reading.

    ``declare_length`` sends a ``Content-Length`` instead. ``bytes_sent`` counts body bytes the
    client accepted before it stopped reading; ``requests`` is how many requests arrived.
    ``redirect_to`` answers every request with a 302 there instead; ``echo_auth`` answers 401
    with the request's ``Authorization`` header in the body, as careless APIs do.
    """

    def __init__(
        self, size: int = 10_000, *, declare_length: bool = False, redirect_to: str | None = None,
        echo_auth: bool = False,
    ) -> None:
        self.size = size
        self.declare_length = declare_length
        self.redirect_to = redirect_to
        self.echo_auth = echo_auth
        self.bytes_sent = 0
        self.requests = 0
        self._server: _StreamingServer | None = None

    def _body(self) -> Iterable[bytes]:
        record = b'{"id": %d, "pad": "' + b"x" * 1000 + b'"}'
        yield b"["
        sent, index = 1, 0
        while sent < self.size - 1_100:
            piece = (b"," if index else b"") + record % index
            yield piece
            sent += len(piece)
            index += 1
        tail = self.size - sent - 1
        yield b'"' + b" " * max(0, tail - 2) + b'"]' if not index else b" " * max(0, tail) + b"]"

    def _pieces(self) -> Iterable[bytes]:
        buffer = bytearray()
        for piece in self._body():
            buffer += piece
            if len(buffer) >= 256 * 1024:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)

    def _short(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        if self.redirect_to is not None:
            self._short(handler, 302, b"", Location=self.redirect_to)
            return
        if self.echo_auth:
            sent = handler.headers.get("Authorization", "")
            self._short(handler, 401, f'{{"error": "invalid credentials {sent}"}}'.encode())
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if self.declare_length:
            handler.send_header("Content-Length", str(self.size))
        else:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for piece in self._pieces():
                if self.declare_length:
                    handler.wfile.write(piece)
                else:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.bytes_sent += len(piece)
            if not self.declare_length:
                handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True

    def __enter__(self) -> Self:
        server = _StreamingServer(("127.0.0.1", 0), _StreamingHandler)
        server.fake = self
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the fake is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"
