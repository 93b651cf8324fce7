"""Sealing, masking, keeping and rotating tenant secrets (``pipeline.secrets``), and their settings."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet

from pipeline.companies import prepare_config
from pipeline.errors import ConfigError
from pipeline.secrets import MASK, SecretBox, keep_stored_secrets, redact, sealed_paths, unseal
from pipeline.settings import load_settings, settings_environment

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
TOKEN = "sk_live_tenant-token-0123456789"


def rest_config(auth: dict[str, Any]) -> dict[str, Any]:
    return {"base_url": "https://api.example.com", "auth": auth,
            "resources": {"items": {"path": "/items", "primary_key": "id"}}}


def test_an_inline_secret_is_sealed_masked_and_opened_only_with_a_key() -> None:
    box = SecretBox(OLD)
    stored = prepare_config("rest", rest_config({"type": "bearer", "token": TOKEN}), secrets=box)
    assert TOKEN not in repr(stored) and sealed_paths(stored) == [("auth", "token")]
    assert redact(stored)["auth"] == {"type": "bearer", "token": MASK}
    assert unseal(stored, box)["auth"]["token"] == TOKEN
    with pytest.raises(ConfigError, match="PIPELINE_SECRETS_KEY is not set"):
        unseal(stored, SecretBox(None))
    with pytest.raises(ConfigError, match="no key in PIPELINE_SECRETS_KEY decrypts"):
        unseal(stored, SecretBox(NEW))


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    sealed_old = SecretBox(OLD).seal(TOKEN)
    both = SecretBox(f"{NEW}, {OLD}")
    assert both.open(sealed_old) == TOKEN
    rotated = both.rotate(sealed_old)
    assert SecretBox(NEW).open(rotated) == TOKEN
    assert SecretBox(NEW).open(both.seal(TOKEN)) == TOKEN


def test_a_config_without_secrets_needs_no_key() -> None:
    config = rest_config({"type": "bearer", "token_env": "CONNECTOR_ACME"})
    assert prepare_config("rest", config) == config


def test_an_omitted_or_masked_secret_is_kept_only_where_its_auth_kind_is_unchanged() -> None:
    box = SecretBox(OLD)
    stored = prepare_config("rest", rest_config({"type": "header", "name": "X-Api-Key", "value": TOKEN}), secrets=box)
    for auth in ({"type": "header", "name": "X-Other"}, {"type": "header", "name": "X-Api-Key", "value": MASK}):
        kept = prepare_config("rest", rest_config(auth), stored=stored, secrets=box)
        assert unseal(kept, box)["auth"]["value"] == TOKEN
    replaced = prepare_config("rest", rest_config({"type": "header", "name": "X", "value": "new"}), stored=stored,
                              secrets=box)
    assert unseal(replaced, box)["auth"]["value"] == "new"
    merged = keep_stored_secrets(rest_config({"type": "bearer"}), stored)
    assert "token" not in merged["auth"] and "value" not in merged["auth"]


def test_a_sealed_value_in_input_is_refused() -> None:
    stolen = SecretBox(OLD).seal(TOKEN)
    with pytest.raises(ConfigError, match=r"auth\.token: an encrypted secret cannot be given"):
        prepare_config("rest", rest_config({"type": "bearer", "token": stolen}), secrets=SecretBox(OLD))


def test_validation_errors_never_echo_an_inline_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        prepare_config("rest", rest_config({"type": "bearer", "token": TOKEN, "token_env": "CONNECTOR_X"}))
    assert "exactly one of token" in str(caught.value) and TOKEN not in str(caught.value)
    assert caught.value.__cause__ is None


def test_a_bad_secrets_key_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(secrets_key=f"{OLD},not-a-key-value")
    message = str(caught.value)
    assert "PIPELINE_SECRETS_KEY" in message and "key #2" in message
    assert "not-a-key-value" not in message and OLD not in message
    assert caught.value.__cause__ is None


def test_the_secrets_key_reaches_child_processes_but_not_reprs() -> None:
    settings = load_settings(secrets_key=OLD)
    assert OLD not in repr(settings)
    assert settings_environment(settings)["PIPELINE_SECRETS_KEY"] == OLD


@pytest.mark.parametrize(
    "values, variable",
    [
        ({"upstream_allowlist": "10.0.0.0/8, not a host"}, "PIPELINE_UPSTREAM_ALLOWLIST"),
        ({"connector_env_prefix": "PIPELINE_"}, "PIPELINE_CONNECTOR_ENV_PREFIX"),
        ({"connector_env_prefix": "P"}, "PIPELINE_CONNECTOR_ENV_PREFIX"),
        ({"upstream_max_response_bytes": 10}, "PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES"),
    ],
)
def test_bad_connector_security_settings_are_named(values: dict[str, Any], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(**values)
