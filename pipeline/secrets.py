"""Tenant secrets at rest: Fernet under ``PIPELINE_SECRETS_KEY`` (DESIGN invariant 10).

A connector declares which config fields are secrets (``connectors.base.DeclaresSecrets``; the
REST connector: every ``SecretValue`` field). Before a config is stored, each of those values
is replaced by ``{"$secret": "<Fernet token>"}``; nothing else in the pipeline ever sees the
plain value except the worker, which unseals the config right before building the connector.

- ``PIPELINE_SECRETS_KEY`` is a comma-separated list of Fernet keys (``MultiFernet``): the first
  encrypts, every one decrypts, so a new key goes first and the old ones stay until
  ``pipeline secrets rotate`` has re-encrypted every stored secret under the new one.
- Secrets are write-only: ``redact`` shows each as ``"***"`` (API, CLI); an update that omits a
  secret, or sends ``"***"`` back, keeps the stored one (``keep_stored_secrets``).
- A sealed value in *input* is refused: a ciphertext copied from one row must not be decrypted
  on behalf of a config that did not write it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Engine, select

from pipeline.errors import ConfigError

KEY_SETTING = "PIPELINE_SECRETS_KEY"
SEALED = "$secret"
MASK = "***"

ConfigPath = tuple[str | int, ...]


def parse_keys(text: str) -> list[Fernet]:
    """The Fernet keys of a ``PIPELINE_SECRETS_KEY`` value, first (encrypting) key first.

    Raises:
        ValueError: naming the position of an entry that is not a Fernet key (never its value).
    """
    keys = []
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    for position, entry in enumerate(entries, start=1):
        try:
            keys.append(Fernet(entry))
        except ValueError:
            raise ValueError(
                f"key #{position} is not a Fernet key (32 url-safe base64-encoded bytes; "
                "`pipeline secrets keygen` prints a new one)"
            ) from None
    if not keys:
        raise ValueError("no key given")
    return keys


class SecretBox:
    """Encrypts and decrypts tenant secrets with the configured keys.

    Built without keys it still works for configs that hold no secret; sealing or opening one
    raises ``ConfigError`` naming ``PIPELINE_SECRETS_KEY``.
    """

    def __init__(self, keys: str | None) -> None:
        self._fernet = MultiFernet(parse_keys(keys)) if keys and keys.strip() else None

    @classmethod
    def from_settings(cls, settings: Any) -> SecretBox:
        key = settings.secrets_key
        return cls(key.get_secret_value() if key is not None else None)

    @property
    def configured(self) -> bool:
        return self._fernet is not None

    def _require(self, doing: str) -> MultiFernet:
        if self._fernet is None:
            raise ConfigError(f"{KEY_SETTING} is not set: it is needed to {doing}")
        return self._fernet

    def seal(self, value: str) -> dict[str, str]:
        token = self._require("encrypt a secret in a connector config").encrypt(value.encode())
        return {SEALED: token.decode()}

    def open(self, sealed: Mapping[str, Any], *, where: str = "config") -> str:
        fernet = self._require("decrypt the secrets in a connector config")
        try:
            return fernet.decrypt(str(sealed[SEALED]).encode()).decode()
        except (InvalidToken, UnicodeDecodeError):
            raise ConfigError(
                f"{where}: no key in {KEY_SETTING} decrypts this secret (was the key that encrypted it "
                f"removed? keep old keys after the first until `pipeline secrets rotate` has run)"
            ) from None

    def rotate(self, sealed: Mapping[str, Any]) -> dict[str, str]:
        fernet = self._require("re-encrypt stored secrets")
        try:
            return {SEALED: fernet.rotate(str(sealed[SEALED]).encode()).decode()}
        except InvalidToken:
            raise ConfigError(f"no key in {KEY_SETTING} decrypts a stored secret") from None


def is_sealed(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {SEALED} and isinstance(value[SEALED], str)


def _walk(value: Any, path: ConfigPath = ()) -> Iterator[tuple[ConfigPath, Any]]:
    yield path, value
    if is_sealed(value):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, index))


def sealed_paths(config: Any) -> list[ConfigPath]:
    """Where ``config`` holds sealed secrets."""
    return [path for path, value in _walk(config) if is_sealed(value)]


def dotted(path: ConfigPath) -> str:
    return ".".join(str(part) for part in path) or "config"


def _get(config: Any, path: ConfigPath) -> Any:
    for part in path:
        config = config[part]
    return config


def _set(config: Any, path: ConfigPath, value: Any) -> None:
    _get(config, path[:-1])[path[-1]] = value


def _replace_sealed(config: Any, replace: Any) -> Any:
    if is_sealed(config):
        return replace(config)
    if isinstance(config, Mapping):
        return {key: _replace_sealed(item, replace) for key, item in config.items()}
    if isinstance(config, list):
        return [_replace_sealed(item, replace) for item in config]
    return config


def redact(config: Any) -> Any:
    """``config`` with every sealed secret shown as ``"***"``: what an API response or the CLI shows,
    and what validates where only the config's shape matters (planning, field policies)."""
    return _replace_sealed(config, lambda _sealed: MASK)


def unseal(config: Any, box: SecretBox) -> Any:
    """``config`` with every secret decrypted: only for building the connector that uses it."""
    return _replace_sealed(config, box.open)


def refuse_sealed_input(config: Any) -> None:
    """Raise ``ConfigError`` if input carries a sealed value (see the module docstring)."""
    for path in sealed_paths(config):
        raise ConfigError(f"{dotted(path)}: an encrypted secret cannot be given; give the plain value")


def keep_stored_secrets(new: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` with each stored secret it omits (or sends back as ``"***"``) kept.

    A secret is kept where the object that held it is still there and, if that object has a
    ``type`` (an auth kind), the type is unchanged: switching ``bearer`` to ``header`` auth
    drops the bearer token.
    """
    merged = copy.deepcopy(dict(new))
    for path in sealed_paths(stored):
        try:
            parent = _get(merged, path[:-1])
            stored_parent = _get(stored, path[:-1])
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, dict) or parent.get("type") != stored_parent.get("type"):
            continue
        if parent.get(path[-1], MASK) == MASK:
            parent[path[-1]] = dict(_get(stored, path))
    return merged


def seal_config(config: Mapping[str, Any], secret_paths: Sequence[ConfigPath], box: SecretBox) -> dict[str, Any]:
    """``config`` (plain, validated) with the values at ``secret_paths`` sealed, ready to store.

    Raises:
        ConfigError: a secret is ``"***"`` with nothing stored to keep, or no key is configured.
    """
    sealed = copy.deepcopy(dict(config))
    for path in secret_paths:
        value = _get(sealed, path)
        if value == MASK:
            raise ConfigError(f"{dotted(path)}: {MASK!r} stands for a stored secret, but none is stored here; "
                              "give the value")
        _set(sealed, path, box.seal(str(value)))
    return sealed


def check_stored_secrets(engine: Engine, box: SecretBox) -> int:
    """Decrypt every stored secret once: what a worker does at start-up so that a missing or
    wrong ``PIPELINE_SECRETS_KEY`` stops it there, not task by task. Returns the count.

    Raises:
        ConfigError: naming ``PIPELINE_SECRETS_KEY`` and the companies whose secrets it cannot open.
    """
    from pipeline.models import COMPANIES

    unreadable: list[int] = []
    count = 0
    with engine.connect() as conn:
        rows = conn.execute(select(COMPANIES.c.id, COMPANIES.c.connector_config)).all()
    for company_id, config in rows:
        for path in sealed_paths(config or {}):
            count += 1
            if not box.configured:
                unreadable.append(company_id)
                break
            try:
                box.open(_get(config, path))
            except ConfigError:
                unreadable.append(company_id)
                break
    if unreadable:
        shown = ", ".join(map(str, unreadable[:20])) + (" …" if len(unreadable) > 20 else "")
        problem = "is not set" if not box.configured else "does not decrypt them"
        raise ConfigError(f"{KEY_SETTING} {problem}, but companies {shown} store encrypted secrets "
                          "(set it to the key(s) they were encrypted with)")
    return count


def rotate_stored_secrets(engine: Engine, box: SecretBox) -> tuple[int, int]:
    """Re-encrypt every stored secret under the first key, in one transaction: the companies'
    configs and the OAuth2 tokens in ``oauth_tokens``.

    Returns:
        ``(secrets, companies)`` re-encrypted.

    Raises:
        ConfigError: no key configured, or a stored secret no key decrypts (nothing is changed).
    """
    from pipeline.db import transaction
    from pipeline.models import Company

    secrets = companies = 0
    with transaction(engine) as session:
        for company in session.scalars(select(Company).order_by(Company.id).with_for_update()):
            config = company.connector_config or {}
            paths = sealed_paths(config)
            if not paths:
                continue
            rotated = copy.deepcopy(config)
            for path in paths:
                try:
                    _set(rotated, path, box.rotate(_get(config, path)))
                except ConfigError as exc:
                    raise ConfigError(f"company {company.id}, {dotted(path)}: {exc}") from None
            company.connector_config = rotated
            secrets += len(paths)
            companies += 1
        # The OAuth2 tokens the workers store (rotated refresh tokens) are sealed with the same keys.
        from pipeline.oauth_tokens import rotate_sealed_tokens

        secrets += rotate_sealed_tokens(session.connection(), box)
    return secrets, companies
