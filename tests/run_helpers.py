"""Hand-made runs for the tests of verdicts and cautions (no training): a History whose step
snapshots carry a given training-accuracy curve and whose epochs carry given accuracies."""
from bnviz import Config, preset
from bnviz.history import History, Snapshot
from bnviz.runs import Run


def hand_run(curve, final_accs, status="finished", saturated=None, seed=0, examples=0, train_size=None) -> Run:
    """Step snapshots with training accuracy ``curve``; epoch snapshots whose recomputed-statistics
    test accuracy is ``final_accs``; ``saturated`` on every epoch snapshot (a share, or {layer:
    share}); ``examples`` seen by the last snapshot, of a ``train_size`` (the config's)."""
    h = History(config=Config(model=preset("lenet"), seed=seed, epochs=len(final_accs), train_size=train_size))
    snap = dict(epoch=1, examples=examples, time_s=0.0, loss=1.0, test_acc=None, examples_per_s=1.0, lr=0.1,
                bn_momentum=0.1, eps=1e-5, batch_size=8)
    for i, a in enumerate(curve, 1):
        h.snapshots.append(Snapshot(kind="step", step=10 * i, train_acc=a, **snap))
    for j, a in enumerate(final_accs, 1):
        h.snapshots.append(Snapshot(kind="epoch", step=10 * len(curve), train_acc=a,
                                    **{**snap, "epoch": j, "test_acc": a - 0.05}, precise_test_acc=a,
                                    saturated=saturated))
    h.status = status
    return Run(f"seed {seed}", {"variant": "v", "seed": seed}, h)
