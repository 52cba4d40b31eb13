"""The `search:` section's settings and the checkpoint pruning rule, without starting Ray."""

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


def test_checkpoints_to_delete_keeps_the_newest_and_the_resumable_one():
    from refilled.tune.callbacks import checkpoints_to_delete

    names = [f"checkpoint_{i:06d}" for i in (3, 10, 4, 5, 6)] + ["params.json", "checkpoint_tmp"]
    assert checkpoints_to_delete(names, 2, set()) == ["checkpoint_000003", "checkpoint_000004", "checkpoint_000005"]
    # the one Ray's saved state would resume from stays, even when older
    assert checkpoints_to_delete(names, 2, {"checkpoint_000003"}) == ["checkpoint_000004", "checkpoint_000005"]
    assert checkpoints_to_delete(names[:1], 2, set()) == []
