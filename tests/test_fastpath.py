"""The fast path: no host sync per step, the compiled training step (torch.compile) against the
eager one, its fallbacks, and the benchmark scripts' quick modes (crash tests, no timings).

The compiled-vs-eager test really compiles on the CPU (inductor + the C++ compiler): about 1 to
3 minutes per norm the first time on a 2-core machine, seconds once inductor's cache
(/tmp/torchinductor_$USER) is warm. Set BNVIZ_SKIP_COMPILE=1 to skip it.
"""
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bnviz import Config, Trainer, make_synthetic, preset
from bnviz.train import COMPILE_MODES

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def cfg(norm="torch", **kw):
    base = dict(model=preset("lenet-bn", norm=norm), dataset="synthetic", batch_size=256, lr=1.0,
                epochs=3, snapshot_every=2, device="cpu", seed=0)
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def data600():
    """600 training examples = 2 full batches of 256 + a last batch of 88 (two batch shapes)."""
    return make_synthetic(600, 300, seed=2)


def _inductor_problem() -> str | None:
    if os.environ.get("BNVIZ_SKIP_COMPILE", "").strip() in ("1", "true", "yes"):
        return "BNVIZ_SKIP_COMPILE is set"
    if importlib.util.find_spec("torch._inductor") is None:
        return "torch inductor is not available"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (torch.compile on a CPU needs one)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    return None


needs_inductor = pytest.mark.skipif(_inductor_problem() is not None, reason=str(_inductor_problem()))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config


def test_compile_setting_is_validated():
    for ok in (False, True, "force") + COMPILE_MODES:
        assert cfg(compile=ok).compile == ok
    with pytest.raises(ValueError, match="compile must be True, False, 'force'.*reduce-overhead"):
        cfg(compile="fast")
    with pytest.raises(ValueError, match="compile must be"):
        cfg(compile=1.5)


# ----------------------------------------------------------------------------- no host sync per step


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("norm", ["torch", "scratch"])
def test_no_host_sync_per_step(norm, monkeypatch):
    """Every Python-level read of a tensor's value (.item(), float(t), bool(t), .tolist(), .cpu(),
    ...) is counted during a run: there may be one per snapshot, none per step. (On CUDA each
    such read waits for the GPU; a per-step one would cap the speed at the launch latency.)"""
    data = make_synthetic(1200, 300, seed=3)  # 4 full batches + 176: 5 steps per epoch
    reads = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=original, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    h = Trainer(cfg(norm, epochs=2, snapshot_every=1000), data=data).run()
    monkeypatch.undo()
    assert h.status == "finished", h.message
    steps = h.snapshots[-1].step
    assert steps == 10
    # 2 epochs -> 2 'step' snapshots (the epoch's remainder) + 2 'epoch' snapshots.
    assert len(h.snapshots) == 4
    assert reads["n"] <= len(h.snapshots), f"{reads['n']} host reads in {steps} steps"


# ----------------------------------------------------------------------------- fallbacks


def test_compile_falls_back_to_eager_on_cpu_with_the_same_numbers(tiny_data):
    eager = Trainer(cfg(epochs=1), data=tiny_data).run()
    tr = Trainer(cfg(epochs=1, compile=True), data=tiny_data)
    h = tr.run()
    assert h.status == "finished"
    assert "only used on CUDA" in h.message and "running eager on cpu" in h.message
    assert tr.compiled is None
    assert [s.loss for s in h.snapshots] == [s.loss for s in eager.snapshots]


def test_a_failing_compile_falls_back_to_eager_and_says_so(tiny_data, monkeypatch):
    """A compiler that breaks at the first call (as a missing triton or compiler would): the
    run goes on eagerly with the same numbers as an eager run, and the message says why."""

    def broken_compile(fn, **kwargs):
        def call(*a, **k):
            raise RuntimeError("simulated: no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = Trainer(cfg(epochs=2), data=tiny_data).run()
    tr = Trainer(cfg(epochs=2, compile="force"), data=tiny_data)
    h = tr.run()
    assert h.status == "finished", h.message
    assert "torch.compile failed (RuntimeError: simulated: no working C++ compiler)" in h.message
    assert "continues eager" in h.message
    assert tr.compiled.info["fallback"] and tr.compiled.info["calls"] == 0
    assert [s.loss for s in h.snapshots] == [s.loss for s in eager.snapshots]
    assert [s.test_acc for s in h.epochs] == [s.test_acc for s in eager.epochs]


def test_a_genuine_step_error_is_not_hidden_by_the_fallback(monkeypatch):
    """Batch size 1 with BN fails in the eager rerun too: the run reports that error."""
    data = make_synthetic(8, 8, seed=0)

    def broken_compile(fn, **kwargs):
        def call(*a, **k):
            raise RuntimeError("simulated compile failure")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    h = Trainer(cfg(batch_size=1, epochs=1, compile="force", snapshot_every=1000), data=data).run()
    assert h.status == "error"
    assert "Batch size 1 with batch normalization" in h.message


# ----------------------------------------------------------------------------- compiled == eager


@needs_inductor
@pytest.mark.timeout(900)
@pytest.mark.parametrize("norm", ["scratch", "torch"])
def test_compiled_step_matches_eager_and_compiles_once_per_batch_shape(norm, data600):
    """3 epochs of 3 steps (256, 256, 88) with snapshots every 2 steps (snapshot steps run
    eagerly, the others through the captured graph): the same losses, accuracies, parameters and
    running statistics as an eager run, within float32 tolerance; exactly two graphs (batch 256
    and the last batch of 88) for the whole run: no recompile in epochs 2 and 3."""
    from torch._dynamo.utils import counters

    eager_tr = Trainer(cfg(norm), data=data600)
    eager = eager_tr.run()
    torch._dynamo.reset()
    counters.clear()
    tr = Trainer(cfg(norm, compile="force"), data=data600)
    h = tr.run()
    assert h.status == "finished", h.message
    assert h.message == "", h.message  # no fallback
    info = tr.compiled.info
    assert info["fallback"] is None
    assert sorted(info["shapes"]) == [88, 256]
    # steps 1..9; 2, 4, 6, 8 are snapshot steps (eager): 5 compiled calls.
    assert info["calls"] == 5
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])

    assert len(h.snapshots) == len(eager.snapshots)
    for a, b in zip(h.snapshots, eager.snapshots):
        assert (a.kind, a.step, a.examples) == (b.kind, b.step, b.examples)
        assert a.loss == pytest.approx(b.loss, abs=1e-4)
        assert abs(a.train_acc - b.train_acc) * 600 <= 2  # at most 2 argmax ties flipped
        if b.test_acc is not None:
            assert abs(a.test_acc - b.test_acc) * 300 <= 2
        for name, lb in b.layers.items():
            assert a.layers[name].running_var == pytest.approx(lb.running_var, rel=1e-3, abs=1e-5)
    pc, pe = _params(tr.model), _params(eager_tr.model)
    assert pc.keys() == pe.keys()
    for k in pe:
        if pe[k].dtype.is_floating_point:
            diff = (pc[k] - pe[k]).abs().max().item()
            assert diff < 1e-4, f"{k}: max |compiled - eager| = {diff:.2e}"
        else:
            assert torch.equal(pc[k], pe[k]), k  # num_batches_tracked


# ----------------------------------------------------------------------------- benchmark scripts


def _import_bench(name):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.timeout(600)
def test_throughput_script_small_run_ends_with_the_ratio_line(capsys):
    tp = _import_bench("throughput")
    result = tp.main(["--train-size", "1280", "--test-size", "256", "--warmup", "256"])
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio bnviz/d2l: \d+\.\d\d", out[-1]), out[-1]
    assert float(out[-1].split()[-1]) == pytest.approx(result["ratio"], abs=0.006)
    names = [r["name"] for r in result["rows"]]
    assert names == ["bnviz nn.BatchNorm", "bnviz scratch BN", "d2l train_ch6"]
    for r in result["rows"]:
        assert r["examples"] == 1280 and r["examples_per_s"] > 0
    d2l = result["rows"][-1]
    assert "examples/sec" in d2l["printed"] and d2l["svg_renders"] >= 5  # it drew
    assert any("SYNTHETIC" in line for line in out)


def test_throughput_script_rejects_bad_sizes():
    tp = _import_bench("throughput")
    with pytest.raises(SystemExit):
        tp.main(["--train-size", "0"])
    with pytest.raises(SystemExit):
        tp.main(["--train-size", "70000"])


@pytest.mark.timeout(900)
def test_gpu_speed_quick_mode_runs_on_cpu(tmp_path, capsys):
    gs = _import_bench("gpu_speed")
    result = gs.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = result["rows"]
    assert [(r["norm"], r["compile"]) for r in rows] == [
        ("torch", False), ("torch", "reduce-overhead"), ("torch", "default"),
        ("scratch", False), ("scratch", "reduce-overhead"), ("scratch", "default")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["examples_per_s"] > 0
        if r["compile"]:  # a CPU without --force-compile: eager, with the reason
            assert "running eager on cpu" in r["message"]
    assert result["d2l"]["examples_per_s"] > 0
    # The dashboard row: measured when benchmarks/dashboard_overhead.py exists, else a skip note.
    if (BENCH / "dashboard_overhead.py").exists():
        assert result["dashboard"] is not None, result["dashboard_note"]
        assert 0 < result["dashboard"]["fraction"] < 10
    else:
        assert result["dashboard_note"].startswith("skipped")
    assert "| run | epochs | wall s | examples/s |" in out and "QUICK" in out
    saved = (tmp_path / "gpu_speed.json").read_text()
    assert '"quick": true' in saved
    assert "| d2l train_ch6" in (tmp_path / "gpu_speed.md").read_text()
