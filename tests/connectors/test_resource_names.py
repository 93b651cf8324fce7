"""Defect 4: resource names that would be reserved blob key segments are refused by config
validation, naming the resource, instead of failing later in the key builder."""

from __future__ import annotations

import copy
import re

import pytest

from connectors import registry
from errors import ConfigError
from tests.connectors.test_rest_config import SCHEDULE_CONFIG


@pytest.mark.parametrize("name", [".", "..", ".x"])
def test_a_resource_name_starting_with_a_dot_is_rejected_by_config_validation(name: str) -> None:
    config = copy.deepcopy(SCHEDULE_CONFIG)
    config["resources"][name] = config["resources"].pop("users")
    with pytest.raises(ConfigError, match=re.escape("must not start with '.'")):
        registry.validate("rest", config)


def test_a_resource_name_with_an_inner_dot_is_still_accepted() -> None:
    config = copy.deepcopy(SCHEDULE_CONFIG)
    config["resources"]["users.v2"] = config["resources"].pop("users")
    registry.validate("rest", config)
