"""pytest's shared setup: single-threaded torch (the suite runs on 2 cores), and fixtures over tests/helpers.py for
the synthetic data folders and the tiny training run."""
import pytest
import torch

from helpers import flags, write_commonsense, write_glue

torch.set_num_threads(1)


@pytest.fixture
def commonsense_dir(tmp_path):
    """A synthetic commonsense data_dir (boolq and piqa, train and test)."""
    return write_commonsense(tmp_path / "data")


@pytest.fixture
def rte_dir(tmp_path):
    """A synthetic GLUE data_dir holding RTE."""
    return write_glue(tmp_path / "glue", "rte")


@pytest.fixture
def tiny_run(tmp_path, commonsense_dir):
    """-> flags(**kw) of the tiny commonsense run on commonsense_dir, out_dir tmp_path/out."""
    return lambda **kw: flags(**{"data_dir": commonsense_dir, "out_dir": tmp_path / "out", **kw})
