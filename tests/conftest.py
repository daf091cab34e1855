import os
import shutil

import pytest

# Tests never reach for the internet: the synthetic stand-in unless a test says otherwise.
os.environ.setdefault("BNVIZ_DATASET", "synthetic")


@pytest.fixture(scope="session")
def tiny_data():
    """A small synthetic data set (512 train / 256 test) on the CPU."""
    from bnviz.data import make_synthetic

    return make_synthetic(512, 256, seed=1)


@pytest.fixture(scope="session")
def grading_dist(tmp_path_factory):
    """The batch_norm assignment built once per session, from a copy of its folder only (as from a
    clean checkout): (dist folder, manifest). Shared by tests/test_grading*.py."""
    import shutil
    from pathlib import Path

    from bnviz import grading

    source = Path(__file__).resolve().parent.parent / "notebooks" / "assignments" / "batch_norm"
    root = tmp_path_factory.mktemp("assign")
    src = root / "batch_norm"
    shutil.copytree(source, src, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    out = root / "dist"
    before = sorted(p.name for p in src.iterdir())
    manifest = grading.build_assignment(out, src / "batch_norm.ipynb")
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written next to the source
    return out, manifest


@pytest.fixture(scope="session")
def bwrap():
    """The grading sandbox's bubblewrap: skip the test without it, or fail under
    ``BNVIZ_REQUIRE_SANDBOX=1`` (CI). Shared by tests/test_grading*.py and test_sandbox_escape.py."""
    if shutil.which("bwrap") is None:
        if os.environ.get("BNVIZ_REQUIRE_SANDBOX") == "1":
            pytest.fail("bwrap (bubblewrap) is not installed and BNVIZ_REQUIRE_SANDBOX=1")
        pytest.skip("bwrap (bubblewrap) is not installed: apt-get install bubblewrap")
    return "bwrap"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's small-tensor tests: faster, and on a loaded machine much
    faster (two threads make every op wait for a preempted thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
