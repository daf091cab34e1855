"""The measurements chapters 05 and 06 show as visible, editable cells equal the library's
independent implementations: the plain training loop (05, cell ``plain-loop``) equals a grid
member and ``bnviz.plain_loop``; its ``recomputed_accuracy`` equals ``bnviz.precise``; the
layer-health and landscape functions (05) equal ``experiments.layer_health`` and
``experiments.loss_landscape_probe``; 05's ``scale_invariance`` equals ``probes.scale_invariance_check``;
06's ``variance_ratio``, ``bias_check``, ``border_ink`` and ``grad_norms_at_init`` equal
``probes.dropout_variance_shift``, ``bias_check``, ``border_ink`` and ``grad_norms_at_init``; 07's
``batch_stat_noise`` equals ``probes.batch_stat_noise`` and its ``paired_t`` equals ``verdicts.paired``. The cells are read from the notebooks and executed, so a
learner-facing cell that drifts from what the library measures fails here."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnviz import Config, build_lenet, preset
from bnviz import experiments as ex
from bnviz.data import make_synthetic, to_float
from bnviz.grid import train_grid
from bnviz.models import init_weights
from bnviz.plain_loop import plain_train as library_plain_train
from bnviz.precise import precise_bn_accuracy
from run_helpers import hand_run

NB = Path(__file__).resolve().parent.parent / "notebooks"


def cell_namespace(notebook: str, *cell_ids: str) -> dict:
    """Execute the cells ``cell_ids`` of ``notebook`` (in that order) with the names the chapter's
    setup cell imports, and return their namespace."""
    nb = nbformat.read(NB / notebook, as_version=4)
    cells = {c.get("id"): c for c in nb.cells}
    ns = {"copy": copy, "math": math, "pd": pd, "torch": torch, "F": F, "nn": nn, "to_float": to_float,
          "build_lenet": build_lenet, "init_weights": init_weights, "preset": preset, "ex": ex}
    for cid in cell_ids:
        assert cid in cells, f"{notebook} has no cell with id {cid!r}"
        exec(compile(cells[cid].source, f"{notebook}#{cid}", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def data():
    return make_synthetic(320, 200, seed=7)


@pytest.fixture(scope="module")
def loop():
    return cell_namespace("05_optimisation.ipynb", "plain-loop")


def cfg(**kw):
    d = dict(model=preset("lenet-bn"), dataset="synthetic", batch_size=32, lr=0.5, epochs=2, seed=1,
             snapshot_every=5, device="cpu", fast="eager")
    d.update(kw)
    return Config(**d)


def test_the_chapters_plain_loop_equals_a_grid_member_and_the_library_loop(data, loop):
    configs = [cfg(seed=0), cfg(seed=3, lr=0.8), cfg(seed=2)]
    member = train_grid(configs, data=data, progress=False, precise_bn=2000)[1]
    mine = loop["plain_train"](configs[1], data)
    lib = library_plain_train(configs[1], data, precise_bn=2000)
    assert mine["loss"] == pytest.approx([e.loss for e in member.epochs], rel=1e-4)
    assert mine["test_acc"] == pytest.approx([e.test_acc for e in member.epochs], abs=1e-6)
    assert mine["precise_test_acc"] == pytest.approx([e.precise_test_acc for e in member.epochs], abs=1e-6)
    assert mine["loss"] == pytest.approx(lib["loss"], rel=1e-5)
    for p, q in zip(mine["model"].parameters(), lib["model"].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # and the check can fail: another seed is another run
    other = loop["plain_train"](configs[0], data)
    assert other["loss"] != pytest.approx(mine["loss"], rel=1e-4)


def test_recomputed_accuracy_equals_precise_bn_and_leaves_the_model_alone(data, loop):
    run = loop["plain_train"](cfg(epochs=2, lr=2.0, bn_momentum=0.01), data)  # a slow EMA: recomputing matters
    model = run["model"]
    before = model.norm_fc1.running_mean.clone()
    got = loop["recomputed_accuracy"](model, data)
    assert got == pytest.approx(precise_bn_accuracy(model, data), abs=1e-6)
    assert got == pytest.approx(run["precise_test_acc"][-1], abs=1e-6)
    assert torch.equal(model.norm_fc1.running_mean, before)
    assert abs(got - run["test_acc"][-1]) > 0.01  # the EMA number differs: the check can tell them apart


def test_layer_health_and_landscape_cells_equal_the_library(data):
    ns = cell_namespace("05_optimisation.ipynb", "layer-health", "landscape-probe")
    torch.manual_seed(2)
    model = init_weights(build_lenet(preset("lenet-bn")), "d2l")
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    mine = {r["layer"]: r for r in ns["layer_health"](model, x, y, lr=0.7)}
    lib = {r["layer"]: r for r in ex.layer_health(model, x, y, lr=0.7)}
    assert set(mine) == set(lib) == {"conv1", "conv2", "fc1", "fc2"}
    for k in lib:
        assert mine[k]["saturated"] == pytest.approx(lib[k]["saturated"], abs=1e-7)
        assert mine[k]["update_data"] == pytest.approx(lib[k]["update_data"], rel=1e-5)
        assert mine[k]["hist"] == pytest.approx(lib[k]["hist"], abs=1e-6)
    etas = (0.1, 0.5, 2.0)
    got = ns["landscape"](model, x, y, etas)
    want = ex.loss_landscape_probe(model, x, y, etas)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6)
    assert got["grad_norm"] == pytest.approx(want.grad_norm, rel=1e-6)
    assert got["loss_range"] == pytest.approx(want.loss_range, rel=1e-5, abs=1e-7)
    assert got["beta"] == pytest.approx(want.beta, rel=1e-5)


def test_the_variance_ratio_cell_of_06_equals_the_library(data):
    nb = nbformat.read(NB / "06_architecture.ipynb", as_version=4)
    src = next(c.source for c in nb.cells if c.get("id") == "184fd91b")
    head = src.split("\n\n\nxs = ")[0]  # the function, without the cell's use of the chapter's models
    assert "def variance_ratio" in head
    space = {"copy": copy, "torch": torch}
    exec(compile(head, "06_architecture.ipynb#184fd91b", "exec"), space)
    torch.manual_seed(3)
    model = init_weights(build_lenet(preset("lenet-bn", dropout=0.5)), "d2l")
    with torch.no_grad():
        for _ in range(5):
            model.train()(to_float(data.train_x[:128]))
    x = to_float(data.train_x[:256])
    lib = ex.dropout_variance_shift(model, x, layer="fc2")
    assert space["variance_ratio"](model, x, "norm_fc2") == pytest.approx(lib["running_over_eval"], rel=1e-4)


def test_the_scale_invariance_cell_of_05_equals_the_library():
    ns = cell_namespace("05_optimisation.ipynb", "scale-invariance-probe")
    for eps in (1e-12, 1e-5):
        mine = ns["scale_invariance"]((0.1, 10.0, 1000.0), eps=eps)
        lib = ex.scale_invariance_check((0.1, 10.0, 1000.0), eps=eps)
        assert list(mine.columns) == list(lib.columns)
        pd.testing.assert_frame_equal(mine, lib, rtol=1e-9, atol=1e-15)
    # and the check can fail: another layer is another measurement
    other = ns["scale_invariance"]((10.0,), eps=1e-5, layer="fc1")
    assert other["grad_ratio"][0] != pytest.approx(mine["grad_ratio"][1], rel=1e-12) or \
        other["cos_w_grad"][0] != pytest.approx(mine["cos_w_grad"][1], rel=1e-6)


@pytest.mark.parametrize("spec", [preset("lenet-bn"), preset("lenet-bn", norm_position="after"),
                                  preset("lenet-bn", norm_layers=("fc1", "fc2"))])
def test_the_bias_check_cell_of_06_equals_the_library(spec):
    ns = cell_namespace("06_architecture.ipynb", "bias-probe")
    mine, lib = ns["bias_check"](spec), ex.bias_check(spec)
    assert mine["removed"] == lib["removed"] and mine["removed"]
    assert mine["max_abs_diff"] == pytest.approx(lib["max_abs_diff"], rel=1e-9, abs=1e-18)
    assert mine["bias_grad_norm"] == pytest.approx(lib["bias_grad_norm"], rel=1e-9, abs=1e-18)
    assert mine["output_scale"] == pytest.approx(lib["output_scale"], rel=1e-12)


def test_the_border_ink_and_grad_norm_cells_of_06_equal_the_library(data):
    ns = cell_namespace("06_architecture.ipynb", "border-ink-probe", "grad-norms-probe")
    for border in (1, 2, 4):
        assert ns["border_ink"](data, border=border, n=300) == pytest.approx(ex.border_ink(data, border=border, n=300))
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    for kw in ({}, {"bn": True}, {"residual": True}, {"bn": True, "residual": True}):
        model = ex.deep_mlp(6, seed=0, **kw)
        mine, lib = ns["grad_norms_at_init"](model, x, y), ex.grad_norms_at_init(model, x, y)
        assert list(mine) == list(lib) == ["fc1", "fc2", "fc3", "fc4", "fc5", "fc6", "out"]
        assert list(mine.values()) == pytest.approx(list(lib.values()), rel=1e-6)


def test_the_batch_stat_noise_cell_of_07_equals_the_library(data):
    ns = cell_namespace("07_batches.ipynb", "batch-noise-probe")
    torch.manual_seed(4)
    model = init_weights(build_lenet(preset("lenet-bn")), "d2l").train()
    for layer in ("fc1", "conv1"):
        mine = ns["batch_stat_noise"](model, data, (2, 8, 32), layer=layer, n_batches=10, population=256)
        lib = ex.batch_stat_noise(model, data, (2, 8, 32), layer=layer, n_batches=10, population=256)
        pd.testing.assert_frame_equal(mine, lib, rtol=1e-9)
    assert model.training  # the probe leaves the model's mode as it found it


def test_the_caution_rule_of_07_equals_the_library(data):
    from bnviz import verdicts as vd

    rule = cell_namespace("07_batches.ipynb", "caution-rule")["caution_causes"]
    flat, rising = [0.5] * 12, [0.3 + 0.03 * i for i in range(12)]
    noisy = [0.5 + (0.2 if i % 2 else -0.2) for i in range(11)] + [0.7]
    cells = {
        "none": ([hand_run(flat, [0.6] * 3, seed=s) for s in range(3)], None),
        "chance": ([hand_run([0.1] * 12, [a] * 3, seed=s) for s, a in enumerate((0.10, 0.11, 0.113))], None),
        "rising": ([hand_run(rising, [0.6, 0.7, 0.8], seed=s) for s in range(3)], None),
        "noisy": ([hand_run(noisy, [0.6] * 3, seed=s) for s in range(3)], None),
        "rising, one diverged": ([hand_run(rising, [0.6] * 3), hand_run(rising, [0.6] * 3, "diverged", seed=1),
                                  hand_run(rising, [0.7] * 3, seed=2)], None),
        "far": ([hand_run(flat, [0.53] * 3, seed=s) for s in range(3)], 0.88),
        "saturated": ([hand_run(flat, [0.6] * 3, saturated=0.62, seed=s) for s in range(3)], None),
        "fc1 saturated": ([hand_run(flat, [0.6] * 3, saturated={"conv1": 0.3, "fc1": 0.8}, seed=s)
                           for s in range(3)], None),
        "saturated at chance": ([hand_run([0.1] * 12, [0.1] * 3, saturated=0.9, seed=s) for s in range(3)], None),
        "2 of 3 learned": ([hand_run(flat, [a] * 3, seed=s) for s, a in enumerate((0.093, 0.462, 0.678))], None),
        "far from converged": ([hand_run([0.1] * 6 + [0.391] * 3 + [0.758] * 3, [0.7] * 3, seed=s)
                                for s in range(3)], None),
        "under one epoch": ([hand_run(flat, [0.6] * 3, examples=2000, seed=s) for s in range(3)], 8000),
    }
    kinds = set()
    for name, (runs, full) in cells.items():
        size = dict(train_size=full) if name == "under one epoch" else dict(full_size=full)
        mine, lib = rule(runs, **size), vd.cell_causes(runs, **size)
        assert [c.kind for c in mine] == [c.kind for c in lib], name
        assert [c.caution for c in mine] == [c.caution for c in lib], name  # saturation alone: a note in both
        numbers = lambda causes: [x for c in causes for x in (c.value, c.ref)]  # noqa: E731
        assert numbers(mine) == pytest.approx(numbers(lib)), name
        kinds |= {c.kind for c in lib}
    assert kinds == set(vd.CauseKind)  # every kind was exercised
    # and on real runs
    res = ex.run_grid(cfg(lr=0.5, epochs=1, snapshot_every=1), {"BN": {}, "tiny lr": {"lr": 1e-5}}, (0, 1), data=data,
                      progress=False, precise_bn=None)
    found = []
    for c in res.cells():
        mine, lib = rule(c.runs), vd.cell_causes(c.runs)
        assert [x.kind for x in mine] == [x.kind for x in lib]
        assert [x.value for x in mine] == pytest.approx([x.value for x in lib], rel=1e-9)
        found += lib
    assert any(x.kind is vd.CauseKind.NEVER_LEFT_CHANCE for x in found)  # the tiny lr stays at chance


def test_the_paired_t_rule_of_07_equals_the_library():
    ns = cell_namespace("07_batches.ipynb", "paired-t-rule")  # runs the chapter's own check too
    g = torch.Generator().manual_seed(3)
    for n in (3, 5, 8):
        a = (0.8 + 0.05 * torch.rand(n, generator=g)).tolist()
        b = [x + d for x, d in zip(a, (0.02 * torch.randn(n, generator=g) - 0.01).tolist())]
        b_missing = b[:-1] + [None]  # a diverged seed is dropped from the pairs
        for other in (b, b_missing):
            mine, lib = ns["paired_t"](a, other), ex.paired(a, other)
            assert mine == pytest.approx((lib.delta, lib.half_width, lib.p), rel=1e-9)
