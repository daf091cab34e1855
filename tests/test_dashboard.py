"""The lab without a browser: its controls drive a real Trainer and its figures show the History.

Tiny synthetic data (512 training examples) so that each test takes seconds. The reference for
what the figures must show is the trained model itself (its γ/β and running statistics) and the
History the trainer recorded.
"""
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

import importlib  # noqa: E402

train_module = importlib.import_module("bnviz.train")  # (bnviz.train is also the train() function)
from bnviz.dashboard import EARLIER_SLOTS, Lab  # noqa: E402

SMALL = dict(dataset="synthetic", train_size=512, test_size=256, batch_size=64, epochs=1)


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
def lab():
    lab = Lab(**SMALL)
    yield lab
    if lab.trainer is not None:
        lab.trainer.stop()
        lab.wait(60)
        assert not lab.running


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
    np.testing.assert_allclose(np.sort(lab.fig_params.data[1].x), np.sort(norm.weight.detach().numpy()), rtol=1e-6)
    np.testing.assert_allclose(np.sort(lab.fig_params.data[3].x), np.sort(norm.bias.detach().numpy()), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(lab.fig_stats.data[0].y, norm.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lab.fig_stats.data[2].y, norm.running_var.numpy(), rtol=1e-6)
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
    def broken(force):
        raise ValueError("simulated drawing bug")

    monkeypatch.setattr(lab, "_draw_layer", broken)
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
    assert h.status == "error"
    assert lab.message_level == "error"
    assert "Batch size 1 with batch normalization" in lab.message_text
    assert "LayerNorm" in lab.message_text  # it says what to do instead
    assert lab.status_text.startswith("error")
    assert h in lab.histories


def test_save_load_round_trip_keeps_runs(lab, tmp_path):
    h = lab.run_clicked()
    lab.wait(120)
    path = tmp_path / "runs.json"
    lab.w_path.value = str(path)
    assert lab.save_clicked() == path and path.exists()
    other = Lab(**SMALL)
    other.w_path.value = str(path)
    (loaded,) = other.load_clicked()
    assert loaded.status == h.status and loaded.config == h.config
    assert [s.loss for s in loaded.snapshots] == [s.loss for s in h.snapshots]
    assert loaded.snapshots[-1].layers["fc1"].gamma == h.snapshots[-1].layers["fc1"].gamma
    assert loaded.dataset_label == h.dataset_label and loaded in other.histories
    np.testing.assert_allclose(other.fig_curves.data[other._slots[0][0]].y, [s.loss for s in h.steps])
    # a missing or broken file is a message, not an exception
    other.w_path.value = str(tmp_path / "missing.json")
    assert other.load_clicked() == [] and other.message_level == "error" and "No such file" in other.message_text
    (tmp_path / "bad.json").write_text("{not json")
    other.w_path.value = str(tmp_path / "bad.json")
    assert other.load_clicked() == [] and "not a bnviz history file" in other.message_text
    lab.clear_clicked()
    assert lab.histories == [] and all(len(tr.x) == 0 for tr in lab.fig_curves.data)


def test_bad_settings_give_clear_messages():
    with pytest.raises(ValueError, match="powers of two"):
        Lab(**{**SMALL, "batch_size": 3})
    with pytest.raises(ValueError, match="valid:"):
        Lab(**SMALL, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"lr=-1.0 is outside the lab's range \[0.001, 100\]"):
        Lab(**{**SMALL, "lr": -1.0})
    with pytest.raises(ValueError, match="eps"):
        Lab(**{**SMALL, "eps": 10.0})
    with pytest.raises(ValueError, match="data set"):
        Lab(**{**SMALL, "dataset": "cifar"})
    lab = Lab(**SMALL)
    lab.stop_clicked()  # nothing running: a message, no exception
    assert "No run is going" in lab.message_text
    assert lab.save_clicked() is None and lab.message_level == "warning"


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
        until(lambda: lab.fig_params is not params, timeout=30, what="the deaf γ/β figure to be rebuilt")
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
