"""The fast path: no host sync per step, the compiled step against the eager one, the plan and
its fallbacks, the CUDA-graph step (``gpu`` marker: skipped without CUDA), and the benchmark
scripts' quick modes (crash tests, no timings).

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
from torch import nn

from bnviz import Config, Trainer, fastpath, make_synthetic, preset
from bnviz.fastpath import plan

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def cfg(norm="torch", **kw):
    base = dict(model=preset("lenet-bn", norm=norm), dataset="synthetic", batch_size=256, lr=1.0,
                epochs=3, snapshot_every=2, device="cpu", seed=0, fast="eager")
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


def _assert_same_run(h, ref, loss_abs=1e-4, acc_flips=2, n_train=600, n_test=300):
    assert len(h.snapshots) == len(ref.snapshots)
    for a, b in zip(h.snapshots, ref.snapshots):
        assert (a.kind, a.step, a.examples) == (b.kind, b.step, b.examples)
        assert a.loss == pytest.approx(b.loss, abs=loss_abs)
        assert abs(a.train_acc - b.train_acc) * n_train <= acc_flips  # argmax ties may flip
        if b.test_acc is not None:
            assert abs(a.test_acc - b.test_acc) * n_test <= acc_flips
        for name, lb in b.layers.items():
            assert a.layers[name].running_var == pytest.approx(lb.running_var, rel=1e-3, abs=1e-5)
            assert a.layers[name].batch_mean == pytest.approx(lb.batch_mean, rel=1e-3, abs=1e-5)


def _assert_same_params(m1, m2, tol=1e-4):
    p1, p2 = _params(m1), _params(m2)
    assert p1.keys() == p2.keys()
    for k in p2:
        if p2[k].dtype.is_floating_point:
            diff = (p1[k] - p2[k]).abs().max().item()
            assert diff <= tol, f"{k}: max |fast - eager| = {diff:.2e}"
        else:
            assert torch.equal(p1[k], p2[k]), k  # num_batches_tracked


# ----------------------------------------------------------------------------- the plan


def test_fast_setting_is_validated_and_planned_per_device():
    with pytest.raises(ValueError, match="fast='turbo' is not valid; valid: 'auto', 'eager'"):
        cfg(fast="turbo")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        cfg(fast="graph", device="cpu")
    model = nn.Sequential(nn.Linear(2, 2))
    cpu = torch.device("cpu")
    assert plan("auto", model, cpu) == (False, False, "")  # eager on a CPU, no note needed
    assert plan("eager", model, cpu) == (False, False, "")
    compile_, capture, note = plan("graph+compile", model, cpu)
    assert capture is False and "not captured: CUDA graphs need a CUDA device" in note


def test_the_d2l_layer_and_cumulative_torch_bn_are_never_captured():
    from bnviz import build_lenet
    from bnviz.fastpath import capture_unavailable

    cuda = torch.device("cuda")
    assert "d2l-book BN layer" in capture_unavailable(build_lenet(preset("lenet-bn", norm="d2l")), cuda)
    m = build_lenet(preset("lenet-bn"))
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = None
    assert "num_batches_tracked on the host" in capture_unavailable(m, cuda)
    s = build_lenet(preset("lenet-bn", norm="scratch"))
    for bn in s.modules():
        if hasattr(bn, "momentum"):
            bn.momentum = None
    assert capture_unavailable(s, cuda) is None  # the scratch layer keeps the factor on the device


# ----------------------------------------------------------------------------- no host sync per step


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def count_host_reads(monkeypatch) -> dict:
    """Count every Python-level read of a tensor's value until ``monkeypatch.undo()``."""
    reads = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=original, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("norm", ["torch", "scratch"])
def test_no_host_sync_per_step(norm, monkeypatch):
    """Every Python-level read of a tensor's value (.item(), float(t), bool(t), .tolist(), .cpu(),
    ...) is counted during a run: there may be one per snapshot, none per step. (On CUDA each
    such read waits for the GPU; a per-step one would cap the speed at the launch latency.)"""
    data = make_synthetic(1200, 300, seed=3)  # 4 full batches + 176: 5 steps per epoch
    reads = count_host_reads(monkeypatch)
    h = Trainer(cfg(norm, epochs=2, snapshot_every=1000), data=data).fit()
    monkeypatch.undo()
    assert h.status == "finished", h.message
    steps = h.snapshots[-1].step
    assert steps == 10
    # 2 epochs -> 2 'step' snapshots (the epoch's remainder) + 2 'epoch' snapshots.
    assert len(h.snapshots) == 4
    assert reads["n"] <= len(h.snapshots), f"{reads['n']} host reads in {steps} steps"


# ----------------------------------------------------------------------------- fallbacks


def test_auto_on_a_cpu_is_the_eager_step_with_the_same_numbers(tiny_data):
    eager = Trainer(cfg(epochs=1, batch_size=64), data=tiny_data).fit()
    tr = Trainer(cfg(epochs=1, batch_size=64, fast="auto"), data=tiny_data)
    h = tr.fit()
    assert h.status == "finished" and tr.captured is None and h.message == ""
    assert [s.loss for s in h.snapshots] == [s.loss for s in eager.snapshots]


def _broken_compile(fn, **kwargs):
    def call(*a, **k):
        raise RuntimeError("simulated: no working C++ compiler")
    return call


def test_a_failing_compile_falls_back_to_eager_and_says_so(tiny_data, monkeypatch):
    """A compiler that breaks at the first call (as a missing triton or compiler would): the
    run goes on eagerly with the same numbers as an eager run, and the message says why."""
    monkeypatch.setattr(torch, "compile", _broken_compile)
    eager_tr = Trainer(cfg(epochs=2, batch_size=64), data=tiny_data)
    eager = eager_tr.fit()
    tr = Trainer(cfg(epochs=2, batch_size=64, fast="compile"), data=tiny_data)
    h = tr.fit()
    assert h.status == "finished", h.message
    assert "fast path failed (RuntimeError: simulated: no working C++ compiler)" in h.message
    assert "continues eagerly" in h.message
    assert [s.loss for s in h.snapshots] == [s.loss for s in eager.snapshots]
    assert [s.test_acc for s in h.epochs] == [s.test_acc for s in eager.epochs]
    _assert_same_params(tr.model, eager_tr.model, tol=0)  # the failed warm-up left no trace


def test_a_genuine_step_error_is_not_hidden_by_the_fallback(tiny_data, monkeypatch):
    """A model that cannot run fails in the eager step too: fit() raises that error."""
    monkeypatch.setattr(torch, "compile", _broken_compile)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(10, 10))  # expects 10 inputs, gets 784
    tr = Trainer(cfg(epochs=1, batch_size=64, fast="compile"), data=tiny_data, model=wrong)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        tr.fit()
    assert tr.history.status == "error" and "shapes cannot be multiplied" in tr.history.message


# ----------------------------------------------------------------------------- compiled == eager


@needs_inductor
@pytest.mark.timeout(900)
@pytest.mark.parametrize("norm", ["scratch", "torch"])
def test_compiled_step_matches_eager_and_compiles_once_per_batch_shape(norm, data600):
    """3 epochs of 3 steps (256, 256, 88): the same losses, accuracies, parameters, running
    statistics and per-layer batch statistics as an eager run, within float32 tolerance; both
    batch shapes are compiled before the run (setup) and nothing recompiles during it."""
    from torch._dynamo.utils import counters

    eager_tr = Trainer(cfg(norm), data=data600)
    eager = eager_tr.fit()
    torch._dynamo.reset()
    counters.clear()
    tr = Trainer(cfg(norm, fast="compile"), data=data600)
    h = tr.fit()
    assert h.status == "finished", h.message
    assert h.message == "", h.message  # no fallback
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # 256 and 88
    assert h.setup_time_s > 0
    _assert_same_run(h, eager)
    _assert_same_params(tr.model, eager_tr.model)


def test_every_trainer_compiles_its_own_forward_and_a_run_past_the_limit_says_so(tiny_data, data600, monkeypatch):
    """Dynamo's recompile limit is per code object. All Trainers used to compile the same one
    (guards pin eps, momentum, model type, batch shape), so a sweep of eps filled it and each
    later run trained uncompiled without a word. Each Trainer now compiles a fresh copy; one
    that reaches the limit itself falls back to eager with a note. Dynamo runs without
    inductor here (backend 'eager': the limit is dynamo's), with the limit lowered to keep it short."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    # (config.patch, not monkeypatch: monkeypatch's undo deletes a dynamo config entry)
    with torch._dynamo.config.patch(recompile_limit=2):
        for eps in (1e-5, 1e-4, 1e-3):  # 512 = 2 x 256: one batch shape per run
            tr = Trainer(cfg(epochs=1, eps=eps, fast="compile"), data=tiny_data)
            h = tr.fit()
            assert tr.fast.compiled and h.message == "", h.message
    assert counters["stats"]["unique_graphs"] == 3  # all three compiled
    eager = Trainer(cfg(epochs=1), data=data600).fit()
    with torch._dynamo.config.patch(recompile_limit=1):
        tr = Trainer(cfg(epochs=1, fast="compile"), data=data600)  # 256 and 88: two shapes, limit 1
        h = tr.fit()
    assert not tr.fast.compiled and "The fast path failed (FailOnRecompileLimitHit" in h.message
    assert "continues eagerly" in h.message
    assert [s.loss for s in h.snapshots] == [s.loss for s in eager.snapshots]


def test_the_compiled_function_holds_the_gather_the_conversion_and_the_metric_sums(tiny_data, monkeypatch):
    """The gather from the resident data set, uint8 -> float and the metric sums ran as eager
    kernels around the compiled loss; they are inside the compiled function now. A dynamo
    backend that records the graphs it is given (no inductor) shows what was compiled."""
    import operator

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", recording_backend)
    tr = Trainer(cfg(epochs=1, fast="compile"), data=tiny_data)  # 512 = 2 x 256: one batch shape
    h = tr.fit()
    assert tr.fast.compiled and h.message == "", h.message
    assert len(graphs) == 1
    for gm in graphs:
        calls = {(n.op, getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes}
        assert ("call_function", operator.getitem.__name__) in calls  # data.train_x[idx]
        assert ("call_method", "div_") in calls  # uint8 -> float in [0, 1]
        assert ("call_method", "add_") in calls  # the metric sums
        assert ("call_function", "cross_entropy") in calls


# ----------------------------------------------------------------------------- CUDA graphs (gpu)


def _cuda_data():
    return make_synthetic(2000, 500, seed=4).to("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("norm", ["torch", "scratch"])
@pytest.mark.parametrize("fast", ["graph", "graph+compile"])
def test_captured_step_equals_eager_after_50_steps(norm, fast):
    data = _cuda_data()  # 2000 = 7 x 256 + 208: two captured batch sizes
    base = cfg(norm, epochs=7, snapshot_every=10, device="cuda")  # 56 steps
    eager_tr = Trainer(base, data=data)
    eager = eager_tr.fit()
    tr = Trainer(base.replace(fast=fast), data=data)
    h = tr.fit()
    assert h.status == "finished", h.message
    assert tr.captured is not None and tr.captured.info["batch_sizes"] == [208, 256], h.message
    assert tr.captured.info["eval_captures"] == 1 and h.message == ""
    _assert_same_run(h, eager, loss_abs=2e-3, acc_flips=5, n_train=2000, n_test=500)
    _assert_same_params(tr.model, eager_tr.model, tol=2e-3)


@gpu
@needs_cuda
def test_captured_live_lr_change_takes_effect_at_the_next_step():
    """The lr is a device tensor read by the graph: a change applies at the next replay."""
    data = _cuda_data()
    seen = {}

    class Spy:
        def before_step(self, trainer):
            if trainer.step_count == 5:
                trainer.live.set(lr=1e-30)  # applied at the top of the next step
            if trainer.step_count == 6:
                seen["before"] = [p.detach().clone() for p in trainer.model.parameters()]

        def on_snapshot(self, trainer, s):
            if s.step == 8:
                seen["after"] = [p.detach().clone() for p in trainer.model.parameters()]

    tr = Trainer(cfg(epochs=1, snapshot_every=8, device="cuda", fast="graph"), data=data, callbacks=[Spy()])
    h = tr.fit()
    assert tr.captured is not None, h.message
    (change,) = h.changes
    assert change.step == 7 and change.new == 1e-30
    for a, b in zip(seen["before"], seen["after"]):
        assert torch.equal(a, b)  # steps 7 and 8 ran with lr 1e-30: below float32 resolution


@gpu
@needs_cuda
def test_captured_run_has_no_host_sync_per_step(monkeypatch):
    data = _cuda_data()
    reads = count_host_reads(monkeypatch)
    tr = Trainer(cfg(epochs=3, snapshot_every=1000, device="cuda", fast="graph"), data=data)
    h = tr.fit()
    monkeypatch.undo()
    assert tr.captured is not None, h.message
    assert reads["n"] <= len(h.snapshots), f"{reads['n']} host reads in {h.snapshots[-1].step} steps"


@gpu
@needs_cuda
def test_captured_momentum_change_recaptures_and_matches_eager():
    data = _cuda_data()

    class Change:
        def before_step(self, trainer):
            if trainer.step_count == 3:
                trainer.live.set(bn_momentum=0.5, eps=1e-3)

    runs = {}
    for fast in ("eager", "graph"):
        tr = Trainer(cfg("scratch", epochs=2, snapshot_every=4, device="cuda", fast=fast), data=data,
                     callbacks=[Change()])
        runs[fast] = (tr, tr.fit())
    tr, h = runs["graph"]
    assert tr.captured is not None and tr.captured.info["recaptures"] == 1, h.message
    _assert_same_run(h, runs["eager"][1], loss_abs=2e-3, acc_flips=5, n_train=2000, n_test=500)


@gpu
@needs_cuda
def test_captured_dropout_run_equals_eager():
    """The warm-up's draws from the CUDA RNG are undone: the replays draw the eager run's masks."""
    data = _cuda_data()
    base = cfg(epochs=2, snapshot_every=4, device="cuda", model=preset("lenet-bn", dropout=0.3))
    eager = Trainer(base, data=data).fit()
    tr = Trainer(base.replace(fast="graph"), data=data)
    h = tr.fit()
    assert tr.captured is not None, h.message
    _assert_same_run(h, eager, loss_abs=2e-3, acc_flips=5, n_train=2000, n_test=500)


@gpu
@needs_cuda
def test_a_real_capture_failure_mid_run_goes_eager_with_the_same_numbers():
    """An error inside a real capture (the re-capture after a momentum change): the capture
    ends, the stream is left, the state restored, and the run goes on eagerly."""
    data = _cuda_data()

    class FailInCapture:
        def on_fit_start(self, trainer):
            def hook(module, inputs):
                if torch.cuda.is_current_stream_capturing() and trainer.step_count >= 3:
                    raise RuntimeError("injected: fails inside the capture")
            trainer.model.register_forward_pre_hook(hook)

        def before_step(self, trainer):
            if trainer.step_count == 3:
                trainer.live.set(bn_momentum=0.5)

    class Change:
        def before_step(self, trainer):
            if trainer.step_count == 3:
                trainer.live.set(bn_momentum=0.5)

    base = cfg("scratch", epochs=2, snapshot_every=4, device="cuda")
    eager = Trainer(base, data=data, callbacks=[Change()]).fit()
    tr = Trainer(base.replace(fast="graph"), data=data, callbacks=[FailInCapture()])
    h = tr.fit()
    assert tr.captured is None and "The fast path failed at step 5 (RuntimeError: injected" in h.message
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    _assert_same_run(h, eager, loss_abs=2e-3, acc_flips=5, n_train=2000, n_test=500)


@gpu
@needs_cuda
def test_twenty_finished_runs_do_not_grow_gpu_memory():
    """fit() releases its graphs and their pools (they held the eval activations for the
    whole test set): memory after run 20 is memory after run 2, with the garbage collector off."""
    import gc

    data = _cuda_data()
    c = cfg(epochs=1, snapshot_every=100, device="cuda", fast="graph")
    gc.collect()
    gc.disable()
    try:
        used = []
        for i in range(20):
            h = Trainer(c, data=data).fit()
            assert h.status == "finished" and h.message == "", h.message
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            used.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    finally:
        gc.enable()
    # A leaked run keeps its graphs' private pools reserved (~30 MB here: the eval graph holds the
    # activations of 500 test images). A finished Trainer itself (model, grads, optimizer: about
    # 0.5 MB) is a reference cycle that may wait for the GC: allow 1 MiB allocated per run.
    assert used[-1][0] - used[1][0] < 18 * 2**20, used
    assert used[-1][1] - used[1][1] < 64 * 2**20, used


def _grid_configs(k, **kw):
    return [cfg(epochs=2, snapshot_every=4, device="cuda", fast="graph", seed=s, lr=(0.5, 1.0)[s % 2], **kw)
            for s in range(k)]


@gpu
@needs_cuda
def test_captured_grid_equals_solo_runs():
    from bnviz.grid import VmapGroup

    data = _cuda_data()
    configs = _grid_configs(4)
    group = VmapGroup(configs, data, None)
    hists = group.fit()
    assert group.captured is not None and group.captured.info["batch_sizes"] == [208, 256], hists[0].message
    for c, h in zip(configs, hists):
        _assert_same_run(h, Trainer(c.replace(fast="eager"), data=data).fit(), loss_abs=5e-3, acc_flips=8,
                         n_train=2000, n_test=500)


@gpu
@needs_cuda
def test_captured_grid_with_a_diverging_member_equals_solo_runs():
    from bnviz.grid import VmapGroup

    data = _cuda_data()
    lenet = preset("lenet")
    configs = [c.replace(model=lenet) for c in _grid_configs(3)]
    configs[1] = configs[1].replace(lr=1e4)
    group = VmapGroup(configs, data, None)
    hists = group.fit()
    assert group.captured is not None, hists[0].message
    solo = [Trainer(c.replace(fast="eager"), data=data).fit() for c in configs]
    assert hists[1].status == solo[1].status == "diverged" and hists[1].message == solo[1].message
    for k in (0, 2):
        assert hists[k].status == "finished"
        _assert_same_run(hists[k], solo[k], loss_abs=5e-3, acc_flips=8, n_train=2000, n_test=500)


# ----------------------------------------------------------------------------- benchmark scripts


def _import_bench(name):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.timeout(600)
def test_throughput_script_small_run_ends_with_the_median_ratio_line(capsys):
    tp = _import_bench("throughput")
    result = tp.main(["--train-size", "1280", "--test-size", "256", "--warmup", "256", "--rounds", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"ratio bnviz/d2l: median (\d+\.\d\d) \(range (\d+\.\d\d)-(\d+\.\d\d) over 3 round\(s\), "
                     r"load avg .* at the end\)", out[-1])
    assert m, out[-1]
    ratios = result["ratios"]
    assert len(ratios) == 3 and float(m.group(1)) == pytest.approx(sorted(ratios)[1], abs=0.006)
    assert (float(m.group(2)), float(m.group(3))) == pytest.approx((min(ratios), max(ratios)), abs=0.006)
    names = [r["name"] for r in result["rows"]]
    # scratch BN once; then each round times both sides, the order swapping every round
    assert names == ["bnviz scratch BN"] + ["bnviz nn.BatchNorm", "d2l train_ch6"] * 3
    rounds = [ln.split(":")[0] + ":" + ln.split()[2] for ln in out if ln.startswith("round") and "examples/s" in ln]
    assert rounds == ["round 1:bnviz", "round 1:d2l", "round 2:d2l", "round 2:bnviz", "round 3:bnviz",
                      "round 3:d2l"], rounds
    for r in result["rows"]:
        assert r["examples"] == 1280 and r["examples_per_s"] > 0
    for k, ratio in enumerate(ratios):
        bn, d2l = result["rows"][1 + 2 * k], result["rows"][2 + 2 * k]
        assert ratio == pytest.approx(bn["examples_per_s"] / d2l["examples_per_s"])
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
    assert [(r["norm"], r["fast"], r.get("channels_last", False)) for r in rows] == [
        ("torch", "eager", False), ("torch", "graph", False), ("torch", "auto", False),
        ("scratch", "eager", False), ("scratch", "graph", False), ("scratch", "auto", False),
        ("torch", "graph", True), ("torch", "auto", True)]
    for r in rows:
        if r["fast"] == "graph" and not r.get("channels_last"):  # a CUDA-only mode: a clear skip on a CPU
            assert "needs CUDA" in r["error"]
            continue
        if r.get("channels_last"):
            assert "measured on CUDA" in r["error"]
            continue
        assert "error" not in r, r.get("error")
        assert r["examples_per_s"] > 0
    assert result["d2l"]["examples_per_s"] > 0
    assert result["dashboard"] is not None, result["dashboard_note"]
    assert 0 < result["dashboard"]["fraction"] < 10
    assert "| run | epochs | wall s | examples/s |" in out and "QUICK" in out
    assert set(result["live"][0]["delays_s"]) == {"lr", "bn_momentum", "eps", "bn_momentum+eps"}
    saved = (tmp_path / "gpu_speed.json").read_text()
    assert '"quick": true' in saved
    assert "| d2l train_ch6" in (tmp_path / "gpu_speed.md").read_text()


def test_gpu_smoke_refuses_clearly_without_cuda(capsys):
    if CUDA:
        pytest.skip("this machine has CUDA: run the script itself")
    smoke = _import_bench("gpu_smoke")
    assert smoke.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "nothing was checked" in err and "SIMULATION" in err
