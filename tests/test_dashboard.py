"""The lab without a browser: its controls drive a real Trainer and its figures show the History.

Tiny synthetic data (512 training examples) so that each test takes seconds. The reference for
what the figures must show is the trained model itself (its γ/β and running statistics) and the
History the trainer recorded. The pace is 'fast' unless a test is about the pace (on CUDA the
lab's default is 'watchable', ~20 s a run). Passes on a CPU and on a CUDA machine.
"""
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

import importlib  # noqa: E402

train_module = importlib.import_module("bnviz.train")  # (bnviz.train is also the train() function)
from bnviz.dashboard import EARLIER_SLOTS, Lab, Pacer  # noqa: E402
from bnviz.history import load_histories, save_histories  # noqa: E402
from bnviz.lab_charts import LabCharts  # noqa: E402

SMALL = dict(dataset="synthetic", train_size=512, test_size=256, batch_size=64, epochs=1, pace="fast")


def host(t):
    """A tensor's values as a numpy array, wherever it lives (CPU or CUDA)."""
    return t.detach().cpu().numpy()


def until(pred, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_threads():
    return [t for t in threading.enumerate() if t.name.startswith("bnviz-run-") and t.is_alive()]


@pytest.fixture
def make_lab():
    """``make_lab(**settings)``: a Lab whose run is stopped at teardown, also when a test fails."""
    labs = []

    def make(watchable_s=None, **changes):
        extra = {} if watchable_s is None else {"watchable_s": watchable_s}
        labs.append(Lab(**{**SMALL, **changes}, **extra))
        return labs[-1]

    yield make
    for lab in labs:
        if lab.trainer is not None:
            lab.trainer.stop()
            lab.wait(60)
            assert not lab.running


@pytest.fixture
def lab(make_lab):
    return make_lab()


def current_traces(lab):
    """The bold (current run) loss, train-acc and test-acc traces."""
    return [lab.fig_curves.data[i] for i in lab._slots[EARLIER_SLOTS]]


def test_slider_changes_live_params_and_history_marks_it(lab):
    lab.w_epochs.value = 200  # long enough to change things mid-run
    h = lab.run_clicked()
    until(lambda: len(h.steps) >= 2, what="two snapshots")
    lab.w_lr.value = 0.3
    assert lab.trainer.live.has_pending or lab.trainer.live["lr"] == 0.3
    until(lambda: any(c.name == "lr" for c in h.changes), what="the lr change in History.changes")
    lab.w_cumulative.value = True
    until(lambda: any(c.name == "bn_momentum" for c in h.changes), what="the momentum change")
    lab.w_eps.value = 1e-3
    assert "BN eps set to 0.001 from the next step" in lab.message_text
    until(lambda: any(c.name == "eps" for c in h.changes), what="the eps change")
    lab.stop_clicked()
    lab.wait(60)
    by_name = {c.name: c for c in h.changes}
    assert by_name["lr"].old == 1.0 and by_name["lr"].new == pytest.approx(0.3)
    assert by_name["bn_momentum"].old == 0.1 and by_name["bn_momentum"].new is None
    assert by_name["eps"].new == pytest.approx(1e-3)
    # the model really uses the new values
    norm = lab.trainer.model.norm_fc1
    assert norm.momentum is None and norm.eps == pytest.approx(1e-3)
    # snapshots after the change record the new lr
    after = [s for s in h.steps if s.step >= by_name["lr"].step]
    assert after and all(s.lr == pytest.approx(0.3) for s in after)
    # the change is marked on the chart: a dashed line in each of the 3 subplots and a label
    texts = [a.text for a in lab.fig_curves.layout.annotations]
    assert "lr→0.3" in texts and "momentum→cumulative" in texts
    xs = [s.x0 for s in lab.fig_curves.layout.shapes if s.yref == "y domain"]
    assert by_name["lr"].step in xs


def test_snapshot_updates_figures_with_the_run_data(lab):
    assert all(len(tr.x) == 0 for tr in lab.fig_curves.data)
    h = lab.run_clicked()
    lab.wait(120)
    assert h.status == "finished", h.message
    loss, acc, test = current_traces(lab)
    np.testing.assert_allclose(loss.y, [s.loss for s in h.steps])
    np.testing.assert_allclose(acc.y, [s.train_acc for s in h.steps])
    np.testing.assert_allclose(test.y, [s.test_acc for s in h.epochs])
    assert list(loss.x) == [s.step for s in h.steps] and len(loss.x) >= 5
    assert loss.name.startswith("▶ run") and "lr 1" in loss.name
    # γ/β histograms and the running statistics show the trained layer itself (the reference)
    norm = lab.trainer.model.norm_fc1
    np.testing.assert_allclose(np.sort(lab.fig_params.data[1].x), np.sort(host(norm.weight)), rtol=1e-6)
    np.testing.assert_allclose(np.sort(lab.fig_params.data[3].x), np.sort(host(norm.bias)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lab.fig_stats.data[0].y, host(norm.running_mean), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lab.fig_stats.data[2].y, host(norm.running_var), rtol=1e-6)
    assert len(lab.fig_stats.data[1].y) == 120  # this batch's mean, one per channel of fc1
    assert not np.allclose(lab.fig_params.data[1].x, 1.0)  # γ moved away from its start value 1
    # the layer dropdown switches the per-channel view
    lab.w_layer.value = "conv1"
    assert len(lab.fig_params.data[1].x) == 6 and len(lab.fig_stats.data[0].y) == 6
    assert "SYNTHETIC" in lab.fig_curves.layout.title.text and "SYNTHETIC" in lab.fig_params.layout.title.text
    assert lab.status_text.startswith("finished") and "SYNTHETIC" in lab.status_text
    # a second run fades the first into an earlier slot
    h2 = lab.run_clicked()
    lab.wait(120)
    earlier_loss = lab.fig_curves.data[lab._slots[0][0]]
    np.testing.assert_allclose(earlier_loss.y, [s.loss for s in h.steps])
    assert earlier_loss.line.width < current_traces(lab)[0].line.width
    assert current_traces(lab)[0].name.startswith(f"▶ run {h2.run_id}")


def test_stop_ends_the_thread(lab):
    lab.w_epochs.value = 500
    h = lab.run_clicked()
    until(lambda: len(h.steps) >= 1, what="a snapshot")
    thread = lab.trainer._thread
    lab.stop_clicked()
    thread.join(30)
    assert not thread.is_alive()
    assert h.status == "stopped"
    assert lab.status_text.startswith("stopped")
    assert h.epochs[-1].epoch < 500


def test_exception_in_training_is_shown_and_lab_keeps_working(lab, monkeypatch):
    def boom(spec):
        raise RuntimeError("simulated failure while building the model")

    monkeypatch.setattr(train_module, "build_lenet", boom)
    h = lab.run_clicked()
    lab.wait(60)
    assert h.status == "error"
    assert "simulated failure" in h.message
    assert lab.status_text.startswith("error")
    assert lab.message_level == "error" and "simulated failure" in lab.message_text
    assert h in lab.histories
    monkeypatch.undo()
    h2 = lab.run_clicked()
    lab.wait(120)
    assert h2.status == "finished" and h in lab.histories


def test_exception_in_drawing_is_captured_and_training_goes_on(lab, monkeypatch):
    def broken(*args):
        raise ValueError("simulated drawing bug")

    monkeypatch.setattr(lab.charts, "draw_layer", broken)
    h = lab.run_clicked()
    lab.wait(120)
    assert h.status == "finished"
    # the run's end message replaced it in the box, but the log kept the traceback
    assert any("simulated drawing bug" in o.get("text", "") for o in lab.log.outputs)


def test_two_quick_runs_never_start_two_threads(lab):
    lab.w_epochs.value = 100
    seen, done = [], threading.Event()

    def monitor():
        while not done.is_set():
            seen.append(len(run_threads()))
            time.sleep(0.0005)

    mon = threading.Thread(target=monitor)
    mon.start()
    try:
        lab.run_clicked()
        lab.run_clicked()  # two quick clicks
        clickers = [threading.Thread(target=lab.run_clicked) for _ in range(2)]  # and two at once
        for t in clickers:
            t.start()
        for t in clickers:
            t.join(120)
        assert len(run_threads()) == 1
        lab.stop_clicked()
        lab.wait(60)
    finally:
        done.set()
        mon.join()
    assert max(seen) == 1, f"saw {max(seen)} training threads at once"
    assert len(lab.histories) == 4
    assert [h.status for h in lab.histories[:3]] == ["stopped"] * 3
    assert run_threads() == []


def test_batch_size_one_with_bn_is_explained(lab):
    lab.w_batch.value = 1
    h = lab.run_clicked()
    lab.wait(60)
    assert h.status == "error" and h.steps == []  # refused before training
    assert "Batch size 1 with batch normalization" in h.message  # recorded in the History
    assert lab.message_level == "error"
    assert lab.message_text.startswith(f"Run {h.run_id} could not train. Batch size 1 with batch normalization")
    assert "LayerNorm" in lab.message_text  # it says what to do instead
    assert lab.status_text.startswith("error")
    assert h in lab.histories
    # the lab keeps working: the same settings with a batch size BN can use train
    lab.w_batch.value = 64
    h2 = lab.run_clicked()
    lab.wait(120)
    assert h2.status == "finished", h2.message


def test_batch_size_one_during_a_run_is_refused_and_the_run_goes_on(lab):
    lab.w_epochs.value = 200
    h = lab.run_clicked()
    until(lambda: len(h.steps) >= 1, what="a snapshot")
    lab.w_batch.value = 1
    assert lab.message_level == "error" and "Batch size 1 was not applied" in lab.message_text
    until(lambda: len(h.epochs) >= 2, what="the next epoch")
    assert lab.running and h.status == "running"
    assert not any(c.name == "batch_size" for c in h.changes)
    lab.stop_clicked()
    lab.wait(60)
    assert h.status == "stopped"


def test_save_load_round_trip_keeps_runs(lab, tmp_path):
    h = lab.run_clicked()
    lab.wait(120)
    path = tmp_path / "runs.json"
    lab.w_path.value = str(path)
    assert lab.save_clicked() == path and path.exists()
    assert "Added 1 run(s)" in lab.message_text and "now holds 1 run(s)" in lab.message_text
    other = Lab(**SMALL)
    other.w_path.value = str(path)
    (loaded,) = other.load_clicked()
    assert loaded.status == h.status and loaded.config == h.config
    assert [s.loss for s in loaded.snapshots] == [s.loss for s in h.snapshots]
    assert loaded.snapshots[-1].layers["fc1"].gamma == h.snapshots[-1].layers["fc1"].gamma
    assert loaded.dataset_label == h.dataset_label and loaded in other.histories
    np.testing.assert_allclose(other.fig_curves.data[other._slots[0][0]].y, [s.loss for s in h.steps])
    assert other.load_clicked() == [] and "1 already shown" in other.message_text  # not added twice
    # a missing or broken file is a message, not an exception
    other.w_path.value = str(tmp_path / "missing.json")
    assert other.load_clicked() == [] and other.message_level == "error" and "No such file" in other.message_text
    (tmp_path / "bad.json").write_text("{not json")
    other.w_path.value = str(tmp_path / "bad.json")
    assert other.load_clicked() == [] and "not a bnviz history file" in other.message_text
    lab.clear_clicked()
    assert lab.histories == [] and all(len(tr.x) == 0 for tr in lab.fig_curves.data)


def test_bad_settings_give_clear_messages():
    cases = [  # (settings, what the message must say): the Config validators, then the controls' limits
        (dict(batch_size=3), r"batch_size=3 is not on the lab's slider; valid: the powers of two 1, 2, 4"),
        (dict(batch_size=0), r"batch_size=0 is not valid; valid: a positive integer"),
        (dict(learning_rate=0.1), r"unknown lab setting\(s\) \['learning_rate'\]; valid: norm, pool"),
        (dict(lr=-1.0), r"lr=-1.0 is not valid; valid: a positive finite number"),
        (dict(lr=True), r"lr=True is not valid"),
        (dict(lr=1000.0), r"lr=1000.0 is outside the lab's slider range \[0.001, 100\]"),
        (dict(eps=10.0), r"eps=10.0 is outside the lab's slider range \[1e-08, 1\]"),
        (dict(bn_momentum=1.5), r"bn_momentum=1.5 is not valid; valid: a number in \[0, 1\]"),
        (dict(epochs=0), r"epochs=0 is not valid; valid: a positive integer, or None \(train until stopped\)"),
        (dict(epochs=500), r"epochs=500 is beyond the lab's slider; valid: 1 to 50, or None"),
        (dict(dataset="cifar"), r"dataset='cifar' is not valid; valid: .*'fashion-mnist'"),
        (dict(pace="slow"), r"pace='slow' is not offered by the lab; valid: 'fast', 'watchable'"),
        (dict(device="tpu"), r"device='tpu' is not valid; valid: 'auto', 'cpu', 'cuda'"),
        (dict(train_size=-5), r"train_size=-5 is not valid; valid: None \(the whole split\) or a positive"),
        (dict(seed=-1), r"seed=-1 is not valid; valid: an integer in \[0, 2\*\*63\)"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match="invalid lab setting: " + message):
            Lab(**{**SMALL, **changes})
    lab = Lab(**SMALL)
    lab.stop_clicked()  # nothing running: a message, no exception
    assert "No run is going" in lab.message_text
    assert lab.save_clicked() is None and lab.message_level == "warning"


def test_bad_text_input_gets_a_message_and_the_lab_keeps_working(lab, tmp_path):
    lab.w_seed.value = -3  # typed into the seed box
    assert lab.message_level == "error" and "seed=-3 is not valid; valid: an integer in [0, 2**63)" in lab.message_text
    assert lab.run_clicked() is None and lab.trainer is None
    assert lab.message_text.startswith("Cannot start: seed=-3 is not valid")
    lab.w_seed.value = 2
    h = lab.run_clicked()
    lab.wait(120)
    assert h.status == "finished" and h.config.seed == 2
    lab.w_path.value = "   "  # no file name
    assert lab.save_clicked() is None and lab.message_level == "error" and "Enter a file name" in lab.message_text
    lab.w_path.value = str(tmp_path)  # a folder, not a file: reported, nothing written
    assert lab.save_clicked() is None and lab.message_level == "error" and "Not saved" in lab.message_text
    assert list(tmp_path.iterdir()) == []


def test_watchable_pace_stretches_a_short_run(lab, make_lab):
    """At the watchable pace a run lasts about ``watchable_s`` however fast the device is (the host
    pauses before steps); as fast as possible it does not pause."""
    fast = lab.run_clicked()
    lab.wait(120)
    assert fast.status == "finished" and lab.pacer.slept_s == 0
    # 4 steps of 128 examples, 512 examples per 8 s: the 4th step starts 6 s after the 1st (a step
    # takes well under a second even on a busy 2-core CPU, so the pauses make most of it)
    paced_lab = make_lab(pace="watchable", batch_size=128, watchable_s=8.0)
    assert paced_lab.w_pace.value == "watchable"
    t0 = time.perf_counter()
    h = paced_lab.run_clicked()
    paced_lab.wait(120)
    wall = time.perf_counter() - t0
    assert h.status == "finished", h.message
    assert len(h.steps) == 4
    assert wall >= 5.9 and h.wall_time_s >= 5.9, (wall, h.wall_time_s)
    assert paced_lab.pacer.slept_s >= 2.0, paced_lab.pacer.slept_s  # the pauses made the difference
    trained = h.wall_time_s - h.setup_time_s  # (on CUDA the setup compiles and captures the step)
    assert trained < 8.0 * 1.5 + 3.0, f"the watchable pace took {trained:.1f} s for an 8-s run"


def test_pacer_rate_and_until_stopped_rate():
    class Fake:  # what the Pacer reads from a trainer
        class data:
            train_x = range(60000)

        class config:
            epochs = 10

    assert Pacer("watchable", 20.0).rate(Fake) == 60000 * 10 / 20.0  # 10 epochs in 20 s
    Fake.config.epochs = None
    assert Pacer("watchable", 20.0).rate(Fake) == 60000 * 2 / 20.0  # until stopped: 2 epochs per 20 s


def test_stop_interrupts_a_watchable_pause(make_lab):
    lab = make_lab(pace="watchable", watchable_s=80.0)  # 10 s between steps
    h = lab.run_clicked()
    until(lambda: len(h.steps) >= 1, what="the first snapshot")
    time.sleep(0.3)  # well inside the pause before step 2
    t0 = time.perf_counter()
    lab.stop_clicked()
    lab.wait(30)
    assert time.perf_counter() - t0 < 5.0  # not the rest of a 10-s pause
    assert h.status == "stopped" and "Stopped by the user" in h.message
    assert lab.message_level == "warning" and "Stopped by the user" in lab.message_text


def test_pace_can_change_during_a_run(make_lab):
    lab = make_lab(pace="watchable", epochs=2, watchable_s=120.0)
    h = lab.run_clicked()
    until(lambda: len(h.steps) >= 1, what="the first snapshot")
    assert "watchable pace" in lab.status_text
    lab.w_pace.value = "fast"
    assert "as fast as possible" in lab.message_text
    lab.wait(60)  # without the change: 2 minutes
    assert h.status == "finished" and len(h.epochs) == 2


def test_until_stopped_keeps_going_until_stop(lab):
    lab.w_until.value = True
    assert lab.w_epochs.disabled and lab.config().epochs is None
    h = lab.run_clicked()
    until(lambda: len(h.epochs) >= 3, timeout=120, what="three epochs")  # the slider said 1
    assert lab.running and h.status == "running"
    assert "(until stopped)" in lab.status_text and f"run {h.run_id}" in lab.status_text
    time.sleep(0.3)
    assert lab.running  # still going
    lab.stop_clicked()
    lab.wait(60)
    assert h.status == "stopped" and len(h.epochs) >= 3
    loss = current_traces(lab)[0]
    assert list(loss.x) == [s.step for s in h.steps]  # the curve grew with the run
    assert max(loss.x) > 3 * 512 // 64 - 1
    assert Lab(**{**SMALL, "epochs": None}).w_until.value  # show_lab(epochs=None) ticks it


def _small_history(seed: int, tiny_data):
    from bnviz import Config, train

    return train(Config(dataset="synthetic", batch_size=128, epochs=1, seed=seed, device="cpu"),
                 data=tiny_data, progress=False)


def test_save_merges_with_the_runs_in_the_file(lab, tmp_path, tiny_data):
    path = tmp_path / "runs.json"
    save_histories([_small_history(1, tiny_data), _small_history(2, tiny_data)], path)
    old_runs = [json.dumps(r, sort_keys=True) for r in json.loads(path.read_text())["runs"]]
    h = lab.run_clicked()
    lab.wait(120)
    lab.w_path.value = str(path)
    assert lab.save_clicked() == path
    assert lab.message_level == "info"
    assert "Added 1 run(s)" in lab.message_text and "which now holds 3 run(s)" in lab.message_text
    runs = json.loads(path.read_text())["runs"]
    assert len(runs) == 3
    assert [json.dumps(r, sort_keys=True) for r in runs[:2]] == old_runs  # the earlier runs, unchanged
    assert runs[2]["uid"] == h.uid
    # saving again does not repeat the run
    assert lab.save_clicked() == path
    assert "Added 0 run(s)" in lab.message_text and "1 run(s) saved before were updated" in lab.message_text
    assert len(load_histories(path)) == 3


@pytest.mark.parametrize("content", [b"{not json", b'{"some": "other program"}', b"\x00\x01binary"])
def test_save_never_overwrites_a_foreign_or_corrupt_file(lab, tmp_path, content):
    h = lab.run_clicked()
    lab.wait(120)
    assert h.status == "finished"
    path = tmp_path / "notes.json"
    path.write_bytes(content)
    lab.w_path.value = str(path)
    assert lab.save_clicked() is None
    assert path.read_bytes() == content
    assert lab.message_level == "error"
    assert "not a bnviz history file" in lab.message_text and "left as it was" in lab.message_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # no stray temporary file


def test_charts_draw_from_histories_alone(tiny_data):
    """The charts need no lab and no trainer: a History (here one loaded from a file) is enough."""
    h = _small_history(3, tiny_data)
    charts = LabCharts("SYNTHETIC data")
    charts.draw(h, [], h, "conv2", "SYNTHETIC data")
    loss, acc, test = (charts.fig_curves.data[i] for i in charts.slots[EARLIER_SLOTS])
    np.testing.assert_allclose(loss.y, [s.loss for s in h.steps])
    np.testing.assert_allclose(test.y, [s.test_acc for s in h.epochs])
    assert len(charts.fig_params.data[1].x) == 16  # conv2's γ, one per channel
    np.testing.assert_allclose(charts.fig_stats.data[0].y, h.snapshots[-1].layers["conv2"].running_mean)
    assert all(f.layout.width <= 840 for f in charts.figures)  # fits a 1280-px JupyterLab (see test_browser)


def _answer(fig, edit_id):
    """What a plotly view in the browser sends after it applied the update with ``edit_id``."""
    fig.set_state({"_js2py_traceDeltas": {"trace_deltas": [{"uid": t.uid} for t in fig.data],
                                          "trace_edit_id": edit_id}})


def test_figure_whose_browser_model_stops_answering_is_rebuilt():
    """A browser model that never answers an update (anywidget drops every message to a model whose
    ES module loaded too slowly) is replaced by a new widget with the current data; a figure whose
    view answers, or that no view ever showed (headless), is left alone."""
    # revive_after leaves room for the answering thread on a loaded machine (GIL, 2 cores)
    lab = Lab(**SMALL, revive_after=2.0)
    params, stats, curves = lab.fig_params, lab.fig_stats, lab.fig_curves
    for fig in (params, stats):
        _answer(fig, 0)  # both rendered in a page (the view's first deltas carry the initial edit id)
    answering = threading.Event()

    def answer_stats():  # the stats view keeps answering every update, like a live page
        while not answering.is_set():
            with stats._sync_lock:
                _answer(stats, stats._last_trace_edit_id)
            time.sleep(0.02)

    t = threading.Thread(target=answer_stats, daemon=True)
    t.start()
    try:
        h = lab.run_clicked()
        lab.wait(120)
        # the rebuild swaps the figure in, then closes the old widget: wait for both steps
        until(lambda: lab.fig_params is not params and params.comm is None, timeout=30,
              what="the deaf γ/β figure to be rebuilt and the old one closed")
    finally:
        answering.set()
        t.join(5)
    assert h.status == "finished"
    assert lab.fig_stats is stats and lab.fig_curves is curves  # answered / never shown: kept
    new = lab.fig_params
    assert lab.figures == (curves, new, stats)
    box = lab.widget.children[-2]
    assert new in box.children and params not in box.children  # swapped in place in the page
    assert params.comm is None  # the old widget is closed
    # the rebuilt figure starts with the current picture: the last snapshot's γ of layer fc1
    last = h.snapshots[-1].layers["fc1"]
    np.testing.assert_allclose(np.sort(new.data[1].x), np.sort(np.asarray(last.gamma, dtype=float)))
    assert f"step {h.snapshots[-1].step}" in new.layout.title.text
    assert lab.revivals == 1


def test_rebuilds_are_bounded_and_then_the_learner_is_told():
    lab = Lab(**SMALL, revive_after=0.0)
    for k in range(10):
        fig = lab.fig_params
        _answer(fig, 0)
        with fig._sync_lock, fig.batch_update():
            fig.data[1].x = np.arange(3.0) + 100.0 * (k + 1)  # a new value: a trace edit is sent
        fig.sent()
        time.sleep(0.01)
        lab._check_figures()
    from bnviz.dashboard import MAX_REVIVALS
    assert lab.revivals == MAX_REVIVALS + 1
    assert lab.message_level == "warning" and "Reload the page" in lab.message_text


def test_figure_that_answered_once_is_never_rebuilt():
    """A model that answered an update receives messages: later silence (a hidden tab, a slow
    page, a closed tab) must not make the lab rebuild it."""
    lab = Lab(**SMALL, revive_after=0.0)
    fig = lab.fig_params
    _answer(fig, 0)
    for k in range(3):
        with fig._sync_lock, fig.batch_update():
            fig.data[1].x = np.arange(3.0) + k
        fig.sent()
        if k == 0:
            _answer(fig, fig._last_trace_edit_id)
        time.sleep(0.01)
        lab._check_figures()
    assert lab.fig_params is fig and lab.revivals == 0


def test_default_pace_is_watchable_on_cuda_and_fast_on_cpu(monkeypatch):
    import torch

    import bnviz.lab_controls as controls

    monkeypatch.setattr(controls, "resolve_device", lambda device="auto": torch.device("cuda"))
    gpu = controls.default_settings()
    assert gpu["pace"] == "watchable" and gpu["epochs"] == 10 and gpu["train_size"] is None
    monkeypatch.setattr(controls, "resolve_device", lambda device="auto": torch.device("cpu"))
    cpu = controls.default_settings()
    assert cpu["pace"] == "fast" and cpu["epochs"] == 3 and cpu["train_size"] == 10000
    monkeypatch.undo()
    explicit = Lab(dataset="synthetic", train_size=512, device="cpu")  # a CPU lab on any machine
    assert explicit.w_pace.value == "fast"
