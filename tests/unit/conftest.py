"""Fixtures of the unit tests."""

import os
import shutil

import pytest

from training.local_group import one_rank_group


@pytest.fixture(scope="session")
def process_group():
    """This process as a gloo group of one rank, for the loop's DeepSpeed engines: one for the whole session, as a
    worker has (DeepSpeed keeps the first group it sees; a second one, after the first was destroyed, is
    "not registered")."""
    with one_rank_group():
        yield


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An MLflow sqlite store with its tables made, once: MLflow migrates a new store's schema (a second or two
    each, about twenty tests)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    here = os.getcwd()
    os.chdir(folder)  # its Default experiment's artifacts go there, never into the working tree's ./mlruns
    try:
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(here)
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_template) -> str:
    """A real MLflow store of this test's own (sqlite, no server): a copy of the migrated template."""
    shutil.copyfile(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
