"""Fixtures of the unit tests."""

import pytest

from training.local_group import one_rank_group


@pytest.fixture(scope="session")
def process_group():
    """This process as a gloo group of one rank, for the loop's DeepSpeed engines: one for the whole session, as a
    worker has (DeepSpeed keeps the first group it sees; a second one, after the first was destroyed, is
    "not registered")."""
    with one_rank_group():
        yield
