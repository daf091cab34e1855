import os

import pytest

# Tests never reach for the internet: the synthetic stand-in unless a test says otherwise.
os.environ.setdefault("BNVIZ_DATASET", "synthetic")


@pytest.fixture(scope="session")
def tiny_data():
    """A small synthetic data set (512 train / 256 test) on the CPU."""
    from bnviz.data import make_synthetic

    return make_synthetic(512, 256, seed=1)
