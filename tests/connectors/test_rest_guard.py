"""The SSRF guard, the response cap and the sanitised error excerpts of the REST connector's HTTP client."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from connectors import registry
from connectors.base import ConnectorContext, FetchRequest
from connectors.net import NetworkPolicy, UpstreamRefused, refusal
from connectors.rest import RestConnector
from pipeline.errors import ConfigError, UpstreamError
from tests.connectors.support import SECRET, loopback_connector, loopback_context
from tests.fakes.upstreams import BigPageApi, ScheduleApi, StripeApi

REQUEST = FetchRequest(company_id=1, external_id=None, resource="items", partition="all")


def items_config(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"base_url": base_url, "resources": {"items": {"path": "/items", "primary_key": "id"}}, **extra}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback port that records connections: they wait in its backlog, never accepted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.7", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a9fe:a9fe::", "link-local"),
        ("64:ff9b::10.0.0.1", "private"),
    ],
)
def test_internal_addresses_are_refused_including_their_ipv6_forms(address: str, reason: str) -> None:
    found = refusal(ipaddress.ip_address(address))
    assert found is not None and reason in found


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_admitted(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allowlist_admits_networks_on_any_port_and_hosts_on_their_port() -> None:
    policy = NetworkPolicy.parse("10.20.0.0/16, billing.internal:8443, [::1]:9000, 127.0.0.1:8080")
    loopback = ipaddress.ip_address("127.0.0.1")
    assert policy.refusal("x", ipaddress.ip_address("10.20.3.4"), 1) is None
    assert policy.refusal("x", ipaddress.ip_address("10.21.3.4"), 1) is not None
    assert policy.refusal("billing.internal", ipaddress.ip_address("10.9.9.9"), 8443) is None
    assert policy.refusal("billing.internal", ipaddress.ip_address("10.9.9.9"), 443) is not None
    assert policy.refusal("::1", ipaddress.ip_address("::1"), 9000) is None
    assert policy.refusal("127.0.0.1", loopback, 8080) is None
    assert policy.refusal("127.0.0.1", loopback, 8081) is not None


@pytest.mark.parametrize("entry", ["not a host", "db:99999", "[::1", "host/path"])
def test_a_bad_allowlist_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError) as caught:
        NetworkPolicy.parse(f"10.0.0.0/8,{entry}")
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize(
    "base_url, address",
    [
        ("http://169.254.169.254/", "169.254.169.254"),
        ("http://127.0.0.1:8080", "127.0.0.1"),
        ("https://[::ffff:127.0.0.1]/api", "127.0.0.1"),
        ("http://2130706433/", "127.0.0.1"),
        ("http://10.0.0.5", "10.0.0.5"),
        ("http://[fd00::1]:81", "fd00::1"),
    ],
)
def test_an_ip_literal_base_url_that_is_refused_fails_validation_naming_the_address(
    base_url: str, address: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("rest", items_config(base_url))
    message = str(caught.value)
    assert "base_url" in message and address in message and "PIPELINE_UPSTREAM_ALLOWLIST" in message


def test_an_allowlisted_ip_literal_and_a_host_name_pass_validation() -> None:
    context = ConnectorContext(network=NetworkPolicy.parse("10.0.0.0/8"))
    assert registry.validate("rest", items_config("http://10.1.2.3:8080"), context=context) == []
    # Names are resolved (and checked) when connecting, where the worker's resolver answers.
    assert registry.validate("rest", items_config("https://api.example.com")) == []


def test_a_refused_loopback_port_fails_at_once_naming_the_address_and_no_connection_is_made(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    # Loopback is allowlisted on another port only: this one stays refused.
    context = ConnectorContext(network=NetworkPolicy.parse(f"127.0.0.1:{port + 1}"))
    connector = RestConnector(items_config(f"http://localhost:{port}"), context=context)
    try:
        with pytest.raises(UpstreamRefused) as caught:
            connector.fetch(REQUEST)
    finally:
        connector.close()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "loopback" in message and "PIPELINE_UPSTREAM_ALLOWLIST" in message
    assert caught.value.retryable is False
    assert connections(listener) == 0, "the guard connected before refusing"


def test_the_guard_connects_to_the_checked_address_keeping_the_host_name(stripe_api: StripeApi) -> None:
    port = stripe_api.base_url.rsplit(":", 1)[1]
    config = {"base_url": f"http://localhost:{port}",
              "resources": {"customers": {"path": "/v1/customers", "records": "data", "primary_key": "id"}}}
    connector = loopback_connector(config)
    try:
        chunk = connector.fetch(FetchRequest(company_id=1, external_id=None, resource="customers", partition="all"))
    finally:
        connector.close()
    assert chunk.records
    assert stripe_api.requests[0].headers["Host"] == f"localhost:{port}"


def test_a_redirect_to_an_internal_address_is_not_followed(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with BigPageApi(redirect_to=f"http://127.0.0.1:{port}/latest/meta-data/") as api:
        connector = loopback_connector(items_config(api.base_url))
        try:
            with pytest.raises(UpstreamError) as caught:
                connector.fetch(REQUEST)
        finally:
            connector.close()
    assert "redirects are not followed" in str(caught.value) and caught.value.retryable is False
    assert connections(listener) == 0


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
def test_a_body_over_the_cap_fails_permanently_naming_the_cap_without_reading_it_all(declare_length: bool) -> None:
    cap = 256 * 1024
    with BigPageApi(4 * 1024 * 1024, declare_length=declare_length) as api:
        connector = RestConnector(items_config(api.base_url), context=loopback_context(max_response_bytes=cap))
        try:
            with pytest.raises(UpstreamError) as caught:
                connector.fetch(REQUEST)
        finally:
            connector.close()
        sent = api.bytes_sent
    message = str(caught.value)
    assert "PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES" in message and str(cap) in message
    assert caught.value.retryable is False
    assert sent < 4 * 1024 * 1024, "the client read the whole body"


def test_a_body_under_the_cap_is_read_whole() -> None:
    with BigPageApi(200 * 1024) as api:
        connector = RestConnector(items_config(api.base_url), context=loopback_context(max_response_bytes=256 * 1024))
        try:
            chunk = connector.fetch(REQUEST)
        finally:
            connector.close()
    assert len(chunk.records) > 150


def test_error_excerpts_and_envelope_messages_keep_printable_text_only_and_are_bounded(
    schedule_api: ScheduleApi,
) -> None:
    hostile = "\x1b[2J\x1b]8;;http://evil\x07click\u202ereversed\x00" + "A" * 5_000
    schedule_api.fail_next("not_success", 1, message=hostile)
    config = {
        "base_url": schedule_api.base_url,
        "resources": {"items": {"path": "/api/dr-schedule/users", "records": "Result", "primary_key": "Id",
                                "envelope": {"success": "IsSuccess", "message": "Message"}}},
    }
    connector = loopback_connector(config)
    try:
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(REQUEST)
    finally:
        connector.close()
    message = str(caught.value)
    assert all(char.isprintable() for char in message)
    assert "click" in message and "A" * 100 in message
    assert len(message) < 500, "the envelope message is bounded"


def test_a_secret_the_upstream_echoes_back_is_scrubbed_from_the_error() -> None:
    with BigPageApi(echo_auth=True) as api:
        connector = loopback_connector(items_config(api.base_url, auth={"type": "bearer", "token": SECRET}))
        try:
            with pytest.raises(UpstreamError) as caught:
                connector.fetch(REQUEST)
        finally:
            connector.close()
    message = str(caught.value)
    assert "HTTP 401" in message and "invalid credentials" in message
    assert SECRET not in message and "***" in message
