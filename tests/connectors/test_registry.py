"""The connector registry: a test-only connector is registered for its block and gone after it."""

from __future__ import annotations

import pytest

from connectors import registry
from errors import ConfigError
from tests.fakes import scripted


def test_a_scoped_connector_is_buildable_inside_its_block_only() -> None:
    assert scripted.NAME not in registry.names(), "a test left the scripted connector registered"
    with scripted.registered():
        assert scripted.NAME in registry.names()
        assert registry.build(scripted.NAME, scripted.install(scripted.Script(pages=scripted.fixed([])))) is not None
    assert scripted.NAME not in registry.names() and scripted.NAME not in registry.config_models()
    with pytest.raises(ConfigError, match="unknown connector 'scripted'"):
        registry.build(scripted.NAME, {})


def test_unregistering_an_unknown_name_is_a_no_op() -> None:
    before = registry.names()
    registry.unregister("never-registered")
    assert registry.names() == before
