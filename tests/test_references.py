"""bnviz.references and benchmarks/reference_runs.py on tiny runs (seconds): the saved History
reads back equal, nothing is overwritten without force, a second run resumes, the table's numbers
are the files' (recomputed here from the raw JSON), a missing or corrupt file gives a note."""
import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest

from bnviz import references as rf
from bnviz.precise import PreciseBNEval
from bnviz.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reference_runs", ROOT / "benchmarks" / "reference_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tiny_data):
    return tiny_data  # conftest's session data set (512 / 256): no extra cost in the suite


TINY_FULL = rf.FULL.replace(epochs=3, snapshot_every=1)  # "full size" here: 3 epochs of 512 images


@pytest.fixture(autouse=True)
def tiny_full(monkeypatch):
    monkeypatch.setattr(rf, "FULL", TINY_FULL)


@pytest.fixture(scope="module")
def runs(tiny):
    """The 'base' arm's config (batch 256), 3 epochs on 512 images: 6 steps, seeds 0 and 1."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rf, "FULL", TINY_FULL)
        return {s: Trainer(rf.arm_config(rf.arm("base"), s), data=tiny, callbacks=(PreciseBNEval(256),)).fit()
                for s in (0, 1)}


def _same(a, b):
    da, db = a.to_dict(), b.to_dict()
    da.pop("run_id"), db.pop("run_id")  # a session counter, renumbered on load by design
    return json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


def test_round_trip_equal_after_load(tmp_path, runs):
    h = runs[0]
    path = rf.save_reference(h, rf.arm("base"), 0, root=tmp_path, wall_s=1.0)
    loaded, meta = rf.load_reference("base", 0, root=tmp_path)
    assert _same(loaded, rf.thin(h))
    assert [s.precise_test_acc for s in loaded.epochs] == [s.precise_test_acc for s in h.epochs]
    assert all(s.layers for s in loaded.epochs) and all(not s.layers for s in loaded.steps)
    assert meta["arm"] == "base" and meta["seed"] == 0 and "SYNTHETIC" in meta["dataset"]
    assert meta["machine"]["torch"] and meta["machine"]["cores"] and meta["date"][:2] == "20" and meta["git"]
    assert path == tmp_path / "base__seed0.json"


def test_refuses_to_overwrite_unless_forced(tmp_path, runs):
    path = rf.save_reference(runs[0], rf.arm("base"), 0, root=tmp_path)
    before = path.read_bytes()
    other = copy.deepcopy(runs[0])
    other.note("a second run of the same arm")
    with pytest.raises(FileExistsError, match="--force"):
        rf.save_reference(other, rf.arm("base"), 0, root=tmp_path)
    assert path.read_bytes() == before
    rf.save_reference(other, rf.arm("base"), 0, root=tmp_path, force=True)
    assert _same(rf.load_reference("base", 0, root=tmp_path)[0], rf.thin(other))


def test_script_resumes_and_refuses_unknown_names(tmp_path, tiny, monkeypatch, capsys):
    rr = _script()
    with pytest.raises(ValueError, match="unknown reference arm 'nope'; valid: base"):
        rr.main(["--only", "nope", "--root", str(tmp_path)], data=tiny)
    rr.main(["--only", "base", "--seeds", "0", "--root", str(tmp_path)], data=tiny)
    path = tmp_path / "base__seed0.json"
    first = path.read_bytes()
    calls = []
    monkeypatch.setattr(rr, "run_one", lambda *a: calls.append(a))
    rr.main(["--only", "base", "--seeds", "0", "--root", str(tmp_path)], data=tiny)
    assert calls == [] and path.read_bytes() == first
    assert "saved already, skipped" in capsys.readouterr().out


def _independent(path):
    """Mean of the last 3 epoch snapshots' precise_test_acc, from the raw JSON."""
    snaps = [s for s in json.loads(Path(path).read_text())["runs"][0]["snapshots"] if s["kind"] == "epoch"]
    accs = [s["precise_test_acc"] for s in snaps][-3:]
    return sum(accs) / 3


def test_table_numbers_are_the_files(tmp_path, runs):
    paths = [rf.save_reference(runs[s], rf.arm("base"), s, root=tmp_path) for s in (0, 1)]
    vals = [_independent(p) for p in paths]
    mean = sum(vals) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in vals))  # n − 1 = 1
    assert std > 0  # two seeds differ, so the spread is checked too
    df = rf.reference_table("00", cpu={"LeNet-BN (base)": 0.5}, root=tmp_path)
    row = df[df["arm"] == "LeNet-BN (base)"].iloc[0]
    m, s = row["reference accuracy"].split(" (")[0].split(" ± ")
    assert float(m) == pytest.approx(mean, abs=5e-4) and float(s) == pytest.approx(std, abs=5e-4)
    assert row["seeds saved"] == "2 of 2" and row["CPU size"] == "0.500"
    by_alias = rf.reference_table("00", cpu={"LeNet-BN, lr 1.0": runs[0]}, root=tmp_path)  # 00's name, a History
    assert by_alias.loc[by_alias["arm"] == "LeNet-BN (base)", "CPU size"].item() == f"{vals[0]:.3f}"
    cpus = [{"other": 0.1}, {"LeNet-BN": 0.25}, {"LeNet-BN (base)": 0.75}]
    listed = rf.reference_table("00", cpu=cpus, root=tmp_path)
    assert listed.loc[listed["arm"] == "LeNet-BN (base)", "CPU size"].item() == "0.250"  # the first that has it
    assert row["source"].startswith("SYNTHETIC, full size, ")


def test_missing_and_corrupt_files_give_a_note(tmp_path, capsys):
    with pytest.raises(rf.ReferenceError, match=r"base__seed0\.json is missing; .*--only base"):
        rf.load_reference("base", 0, root=tmp_path)
    (tmp_path / "base__seed0.json").write_text("{not json")
    with pytest.raises(rf.ReferenceError, match=r"base__seed0\.json is corrupt .*--only base --force"):
        rf.load_reference("base", 0, root=tmp_path)
    df = rf.show_references("00", root=tmp_path)  # a chapter's cell: no exception
    out = capsys.readouterr().out
    assert "NOTE: 4 reference file(s) not found or unreadable" in out and "reference_runs.py" in out
    assert list(df["seeds saved"]) == ["0 of 2", "0 of 2"]
    cmd = "python benchmarks/reference_runs.py --only"
    assert list(df["source"]) == [f"unusable (stale or corrupt): `{cmd} base --force`",
                                  f"not run yet: `{cmd} d2l-lenet`"]
    assert "SYNTHETIC" in out


def test_overlay_traces_are_the_files_curves(tmp_path, runs):
    import plotly.graph_objects as go

    fig = go.Figure()
    assert rf.add_reference_traces(fig, "00", root=tmp_path) == 0 and not fig.data  # nothing saved: unchanged
    paths = [rf.save_reference(runs[s], rf.arm("base"), s, root=tmp_path) for s in (0, 1)]
    assert rf.add_reference_traces(fig, "00", x="epoch", root=tmp_path) == 2
    for trace, path in zip(fig.data, paths):
        epochs = [e for e in json.loads(path.read_text())["runs"][0]["snapshots"] if e["kind"] == "epoch"]
        assert list(trace.x) == [e["epoch"] for e in epochs]
        assert list(trace.y) == [e["precise_test_acc"] for e in epochs]
        assert "SYNTHETIC" in trace.name


def test_a_file_made_with_another_config_is_not_used(tmp_path, runs, tiny, capsys):
    stale = Trainer(rf.arm_config(rf.arm("base"), 0).replace(lr=0.5), data=tiny).fit()
    rf.save_reference(stale, rf.arm("base"), 0, root=tmp_path)
    with pytest.raises(rf.ReferenceError, match=r"another configuration .*\['lr'\].*--only base --force"):
        rf.load_reference("base", 0, root=tmp_path)
    _script().main(["--only", "base", "--seeds", "0", "--root", str(tmp_path)], data=tiny)  # kept, said
    assert "NOT retrained: reference file" in capsys.readouterr().out
    assert rf.reference_table("00", root=tmp_path).iloc[0]["seeds saved"] == "0 of 2"

