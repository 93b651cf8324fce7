"""The ``Connector`` boundary: what every upstream adapter declares and does."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from connectors.net import NetworkPolicy
from connectors.policy import FieldPolicy

if TYPE_CHECKING:
    from connectors.oauth2 import TokenStore

Record = dict[str, Any]
FetchState = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One resource a connector offers: how it is partitioned, keyed, shaped and filtered."""

    name: str
    primary_key: str
    transform: str
    policy: FieldPolicy = field(default_factory=FieldPolicy)
    incremental_field: str | None = None


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Everything a connector needs to fetch the next chunk of one partition.

    ``state`` is ``None`` on the first chunk and otherwise exactly the ``Chunk.state`` the
    previous chunk returned (persisted in ``sync_tasks.fetch_state`` between messages).
    """

    company_id: int
    external_id: str | None
    resource: str
    partition: str
    state: FetchState | None = None
    since: str | None = None
    attempt: int = 1
    deadline: float | None = None
    # ``time.monotonic()`` value past which no wait or request of this fetch may run: the
    # attempt's lease would expire (``deadline`` is the softer time budget).
    lease_deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """The records of one chunk and the state to resume from after it."""

    records: list[Record]
    state: FetchState
    done: bool
    requests: int = 1


class Connector(Protocol):
    """An upstream adapter, built from one company's validated connector config.

    Implementations raise ``ConfigError`` from their constructor for an invalid config
    (naming the key), ``UpstreamError`` from ``fetch`` for upstream failures.
    """

    name: str

    def resources(self) -> Sequence[ResourceSpec]:
        """The resources this company's connector offers."""
        ...

    def partitions(self, resource: str, today: date) -> list[str]:
        """The partition keys of ``resource`` to sync on ``today`` (e.g. one per day ahead)."""
        ...

    def fetch(self, request: FetchRequest) -> Chunk:
        """Fetch one chunk: a bounded number of upstream calls, never more than one budget."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class RateLimiter(Protocol):
    """Spaces requests to one upstream across every worker process and host."""

    def acquire(self, key: str, requests_per_second: float, *, deadline: float | None = None) -> None:
        """Block until the caller may send one request to upstream ``key``.

        Raises:
            DeadlineExceeded: the slot lies past ``deadline`` (a ``time.monotonic()`` value);
                the caller does not wait for it.
        """
        ...


ResponseHook = Callable[[int], None]
SecretPath = tuple[str | int, ...]


@dataclass(frozen=True)
class ConnectorContext:
    """What the operator allows a tenant's connector: built from the settings at the edge.

    Parameters:
        environ: the environment variables a config may name (already limited to ``env_prefix``).
        env_prefix: ``PIPELINE_CONNECTOR_ENV_PREFIX``; a config naming another variable is refused.
        network: where upstream connections may go and how large a response may be.

    The defaults are the strictest: no variables, only public addresses, 64 MiB responses.
    """

    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    env_prefix: str = "CONNECTOR_"
    network: NetworkPolicy = field(default_factory=NetworkPolicy)


@runtime_checkable
class ChecksAdmission(Protocol):
    """A connector whose config names secrets, environment variables or addresses.

    ``registry.validate`` calls both methods before a company's config is stored.
    """

    def check_admission(self, context: ConnectorContext) -> None:
        """Raise ``ConfigError`` naming the key if the config reaches what ``context`` does not allow
        (an environment variable without the prefix, a refused IP-literal address)."""
        ...

    def secret_paths(self) -> Sequence[SecretPath]:
        """The config keys holding secrets, e.g. ``[("auth", "token")]``: sealed before storing."""
        ...


class ConnectorFactory(Protocol):
    """Builds a connector from a company's config; raises ``ConfigError`` naming a bad key.

    ``on_response`` is called with the HTTP status of every upstream response (for metrics);
    connectors that make no HTTP calls ignore it. ``context`` (default: the strictest) says
    which environment variables and addresses the connector may use. ``tokens`` is the
    company's OAuth2 token store (``connectors.oauth2.TokenStore``), used by connectors whose
    config asks for OAuth2.
    """

    def __call__(
        self, config: Mapping[str, Any], *, limiter: RateLimiter | None = None,
        on_response: ResponseHook | None = None, context: ConnectorContext | None = None,
        tokens: TokenStore | None = None,
    ) -> Connector: ...


def resource_spec(connector: Connector, name: str) -> ResourceSpec:
    """Return the named resource of ``connector``.

    Raises:
        ConnectorError: the connector does not offer ``name``.
    """
    from errors import ConnectorError

    for spec in connector.resources():
        if spec.name == name:
            return spec
    offered = ", ".join(spec.name for spec in connector.resources())
    raise ConnectorError(f"connector {connector.name!r} has no resource {name!r} (offers: {offered})")
