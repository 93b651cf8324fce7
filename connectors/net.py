"""Where the upstream HTTP client may connect: the SSRF guard (DESIGN invariant 10).

A tenant's config chooses the URL, so the workers must not become a way into the networks
they sit on. ``GuardedTransport`` resolves every host itself, refuses loopback, private,
link-local (cloud metadata), multicast, unspecified and reserved addresses (IPv4-mapped,
6to4 and NAT64 IPv6 forms are judged by the IPv4 address they carry), and connects to the
address it checked — there is no second lookup a rebinding DNS server could answer
differently. TLS keeps the URL's host name for SNI and certificate checks, and the ``Host``
header is the URL's, so a guarded request looks exactly like an unguarded one upstream.

``PIPELINE_UPSTREAM_ALLOWLIST`` admits what an operator trusts: comma-separated CIDR
networks (``10.20.0.0/16``, ``127.0.0.1``) admit those addresses on any port, and
``host:port`` or ``host`` entries (``billing.internal:8443``, ``[::1]:8080``) admit that host
name or IP literal on that port (any port without one).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import typing
from dataclasses import dataclass, field

import httpcore
import httpx

from errors import ConfigError, ForbiddenUpstream, UpstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWLIST_SETTING = "PIPELINE_UPSTREAM_ALLOWLIST"
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Not "private" to Python's ipaddress, but never a public upstream either.
_ALSO_REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT"),
)


class UpstreamRefused(UpstreamError):
    """The upstream's address is one the guard refuses: the task fails now, with no connection made."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public upstream (``"a loopback address"``), or ``None`` if it is."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = refusal(embedded)
        return f"{reason} (as {embedded})" if reason else None
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address (cloud metadata lives there)"),
        (address.is_multicast, "a multicast address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
    )
    for matched, reason in checks:
        if matched:
            return reason
    for network, name in _ALSO_REFUSED:
        if address.version == network.version and address in network:
            return f"a {name} address"
    if not address.is_global:
        return "not a global address"
    return None


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


@dataclass(frozen=True)
class NetworkPolicy:
    """What the guard admits beyond public addresses, and how big a response may be.

    Parameters:
        networks: CIDR networks admitted on any port.
        hosts: ``(host, port)`` pairs admitted, ``port`` ``None`` for any; ``host`` is a
            lower-case name or a normalised IP literal.
        max_response_bytes: the cap on one (decoded) response body.
    """

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[tuple[str, int | None]] = field(default_factory=frozenset)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    @classmethod
    def parse(cls, allowlist: str, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> NetworkPolicy:
        """Build a policy from ``PIPELINE_UPSTREAM_ALLOWLIST`` text.

        Raises:
            ValueError: naming the entry that is neither a CIDR network nor ``host[:port]``.
        """
        networks: list[IPNetwork] = []
        hosts: set[tuple[str, int | None]] = set()
        for raw in allowlist.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            host, port = entry, None
            if entry.startswith("["):
                inside, bracket, rest = entry[1:].partition("]")
                if not bracket or (rest and not rest.startswith(":")):
                    raise ValueError(f"{entry!r}: write an IPv6 host with a port as [addr]:port")
                host, port = inside, _parse_port(rest[1:], entry) if rest else None
            elif entry.count(":") == 1:
                host, _, port_text = entry.partition(":")
                port = _parse_port(port_text, entry)
            if not host or any(c.isspace() or c in "/@?#[]" for c in host):
                raise ValueError(f"{entry!r} is neither a CIDR network nor host[:port]")
            hosts.add((_normal_host(host), port))
        return cls(tuple(networks), frozenset(hosts), max_response_bytes)

    def _listed(self, host: str, address: IPAddress, port: int) -> bool:
        names = {_normal_host(host), str(address)}
        if any((name, port) in self.hosts or (name, None) in self.hosts for name in names):
            return True
        embedded = _embedded_ipv4(address)
        candidates = [address] if embedded is None else [address, embedded]
        return any(c.version == n.version and c in n for c in candidates for n in self.networks)

    def refusal(self, host: str, address: IPAddress, port: int) -> str | None:
        """Why connecting to ``address:port`` for ``host`` is refused, or ``None`` if it is admitted."""
        reason = refusal(address)
        if reason is None or self._listed(host, address, port):
            return None
        return reason

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is an IP literal the guard would refuse (checked when a config
        is stored; host names are resolved and checked when connecting).

        Raises:
            ForbiddenUpstream: (a ConfigError) naming the address, why it is refused, and the allowlist setting.
        """
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"not a URL httpx can send a request to: {exc}") from None
        # The host as sent (ASCII): ``.host`` would IDNA-decode an ``xn--`` label and raise on a bad
        # one, and an IP literal is never IDNA.
        host = parsed.raw_host.decode("ascii")
        address = literal_address(host)
        if address is None:
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        reason = self.refusal(host, address, port)
        if reason is not None:
            raise ForbiddenUpstream(
                f"{address} is {reason}: refused as an upstream (admit it with {ALLOWLIST_SETTING})"
            )


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host names — including forms like ``2130706433`` or ``0x7f.1``
    that the C resolver reads as IPv4 — or ``None`` for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return ipaddress.ip_address(infos[0][4][0]) if infos else None


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy admits."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self.policy = policy

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host``, in the resolver's order (raising ``httpcore.ConnectError``
        if it has none), before any policy is applied."""
        address = literal_address(host)
        if address is not None:
            return [address]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
            if address not in addresses:
                addresses.append(address)
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.resolve(host, port)
        admitted = [a for a in addresses if self.policy.refusal(host, a, port) is None]
        if not admitted:
            refused = "; ".join(f"{a}:{port} is {self.policy.refusal(host, a, port)}" for a in addresses)
            shown = "" if host in {str(a) for a in addresses} else f" ({host})"
            raise UpstreamRefused(
                f"upstream address refused{shown}: {refused}; no connection was made "
                f"(admit it with {ALLOWLIST_SETTING})"
            )
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in admitted:
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connections go through ``GuardedBackend``.

    No proxy from the environment (a proxy would resolve and connect for us, unchecked), and
    no Unix sockets.
    """

    def __init__(self, policy: NetworkPolicy, *, verify: ssl.SSLContext, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        super().__init__(verify=verify, trust_env=False, limits=limits)
        # httpx builds its httpcore pool without a way to pass a network backend; this is the
        # same pool with ours (httpx 0.28, httpcore 1.x).
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )
