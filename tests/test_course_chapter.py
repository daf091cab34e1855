"""The chapter-setup helper every chapter calls first (bnviz.course.chapter): its header and the
chapter's p-value ledger (the family Holm's correction runs over)."""
import pytest

from bnviz import verdicts as vd
from bnviz.course import Chapter, chapter, default_seeds


def test_the_header_names_data_mode_sizes_seeds_and_machine(monkeypatch, capsys):
    monkeypatch.setenv("BNVIZ_FAST", "1")
    monkeypatch.setenv("BNVIZ_DATASET", "synthetic")
    ch = chapter("99 · test")
    out = capsys.readouterr().out
    assert out.startswith("chapter 99 · test\n")
    assert "data set: SYNTHETIC" in out and "NOT Fashion-MNIST" in out
    assert "mode: fast (BNVIZ_FAST=1); sizes: fast; seeds of a comparison: [0, 1]" in out
    assert "machine: cpu" in out or "machine: cuda" in out or "machine: mps" in out
    assert ch.seeds == default_seeds() == (0, 1) and ch.pvalues == {}
    monkeypatch.delenv("BNVIZ_FAST")
    chapter("99 · test")
    assert "mode: full" in capsys.readouterr().out


def test_the_ledger_keeps_one_p_per_test_and_applies_holm(capsys):
    ch = Chapter("x", (0, 1, 2))
    a = vd.verdict(vd.seed_stats([0.80, 0.82, 0.84]), vd.seed_stats([0.90, 0.93, 0.95]))
    b = vd.paired([0.5, 0.6, 0.7], [0.52, 0.61, 0.69])
    ra, rb = ch.record("a", a), ch.record("b", b)  # returned bound to the ledger (for the Holm status)
    assert (ra.p, rb.p) == (a.p, b.p) and ra.ledger == (ch, "a") and rb.ledger == (ch, "b")
    ch.record("a", a)  # the same test named again is one test
    assert ch.pvalues == {"a": pytest.approx(a.p), "b": pytest.approx(b.p)}
    assert list(ch.holm().values()) == pytest.approx(vd.holm([a.p, b.p]))
    assert ch.kept() == [k for k, p in zip("ab", vd.holm([a.p, b.p])) if p < 0.05]
    ch.report()
    out = capsys.readouterr().out
    assert "made 2 comparisons" in out and "hold after Holm's correction: " in out
