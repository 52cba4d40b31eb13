"""The `search:` section's settings, read without starting Ray."""

import pytest

from refilled.errors import UserError
from refilled.tune.settings import parse_search
from conftest import make_tiny_config


def test_reuse_actors_is_on_by_default_and_can_be_turned_off():
    base = make_tiny_config()
    assert parse_search({}, base).reuse_actors is True
    assert parse_search({"reuse_actors": False}, base).reuse_actors is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_reuse_actors_takes_only_true_or_false(value):
    with pytest.raises(UserError, match="search.reuse_actors must be true or false"):
        parse_search({"reuse_actors": value}, make_tiny_config())
