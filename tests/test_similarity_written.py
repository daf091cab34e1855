"""Issue 24 item 8: similarity of written answers (the markdown answers of hand-graded questions).

``similarity.flag_written`` compares each student's answer to q4 with every other one and with the
public model answer (the source notebook's solution text), by word 4-grams with the question text
removed. Planted answers: six honest ones written independently (different words, same physics:
they must share ideas without being flagged), and copies: the model answer lightly edited,
reordered and trimmed, half of it mixed with an honest answer, and a classmate's answer lightly
edited. The scores are printed; ``WRITTEN_THRESHOLD`` sits between the two groups.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnviz.grading import similarity

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "notebooks" / "assignments" / "batch_norm" / "batch_norm.ipynb"

HONEST = {
    "h1": "My layer outputs beta for every input. With a single example the batch mean is that example, so x minus "
          "the mean is zero in every channel and the variance is zero too. The normalized value is 0/sqrt(eps) = 0, "
          "so y = gamma*0 + beta = beta. The running variance uses the unbiased estimate which divides by N-1 = 0, so "
          "it becomes nan. PyTorch raises a ValueError saying it expected more than 1 value per channel when "
          "training. So you cannot train with batch size 1; set drop_last=True in the DataLoader so a final batch of "
          "one is skipped.",
    "h2": "Both inputs give exactly the same output, [0.5, -1, 2, 0], which is beta. The reason: mean over a batch of "
          "size one equals the input itself, hence (x - mu) = 0 and sigma^2 = 0, and 0 divided by sqrt(0 + 1e-5) is "
          "still 0. Gamma times zero vanishes and only the shift remains. running_var turns into NaN because of the "
          "Bessel correction n/(n-1) with n = 1 (division by zero). Torch's BatchNorm1d refuses with an error in "
          "train mode. Consequence: a batch of 1 carries no information through BN and gradients to earlier layers "
          "are zero; avoid last batches of size one or switch to layer norm.",
    "h3": "The output is just the bias vector beta. Batch statistics computed from one sample are degenerate: the "
          "sample is its own mean and there is no spread, so every normalized activation is zero no matter what we "
          "feed in. For the running variance we update with var*m/(m-1) and m-1 is 0, which yields NaN (0/0), and "
          "after that eval mode is ruined. PyTorch throws 'Expected more than 1 value per channel when training'. In "
          "practice use batch sizes >= 2, drop incomplete final batches, or use GroupNorm/LayerNorm which do not "
          "depend on the batch.",
    "h4": "Output = beta, since x - mean = 0 with one example. running_var is nan (divide by 0). PyTorch gives an "
          "error. Don't train BN with batch size 1.",
    "h5": "With N=1 the layer can't normalize anything: mu equals x and the biased variance is 0, so x_hat is 0 and "
          "the output equals beta regardless of the input values (the two very different inputs, one 100 times "
          "larger, give the same result). The unbiased variance needs N-1 in the denominator, so the running "
          "variance update produces NaN and evaluation mode would output NaN forever. PyTorch detects this and "
          "raises an error instead. This means training with a batch size of 1 is impossible with BN; if the "
          "dataset size leaves a remainder of 1 in the last mini-batch we should drop it.",
    "h6": "I get beta as output both times. Since there's only a single value per channel, subtracting the mean "
          "leaves 0, and dividing by sqrt(var+eps) keeps it at 0, so only the beta term survives. The running_var "
          "becomes nan due to 0/0 in the unbiased correction. PyTorch raises a ValueError. For training this means "
          "each mini-batch needs at least 2 samples, otherwise BN breaks; with conv layers it's different because "
          "H*W values per channel still exist.",
}
EDITS = [("With one example per channel", "With a single example in each channel"), ("equals the example", "is the example itself"),
         ("destroys all information", "throws away all information"), ("PyTorch refuses", "PyTorch does not allow it"),
         ("in practice much larger", "in practice far larger"), ("Expected more than 1 value", "Expected more than one value")]


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.)])\s+(?=[A-Z(])", text.strip())


def _copies(model: str) -> dict[str, str]:
    light = model
    for old, new in EDITS:
        light = light.replace(old, new)
    s = _sentences(model)
    return {"c_model_light": light,
            "c_model_reordered": " ".join([s[2], s[0], s[3], s[1]] + s[5:]),  # one sentence dropped, order changed
            "c_model_half": " ".join(s[: len(s) // 2]) + " " + HONEST["h4"],
            "c_peer": HONEST["h3"].replace("The output is just the bias vector beta.", "The layer only returns beta.")
                                  .replace("degenerate", "useless").replace("ruined", "broken")}


@pytest.fixture(scope="module")
def source_nb():
    return json.loads(SOURCE.read_text(encoding="utf-8"))


def _scores(model: str) -> dict[tuple[str, str], float]:
    texts = dict(HONEST, **_copies(model), **{similarity.MODEL: model})
    return {(p.a, p.b): p.score for p in similarity.compare_written(texts)}


def test_model_answer_and_written_answer_are_read(source_nb):
    model = similarity.model_answer(source_nb, "q4")
    assert model.startswith("With one example per channel") and "LayerNorm" in model
    assert similarity.model_answer(source_nb, "q1") == ""
    student = json.loads(json.dumps(source_nb))  # a submission: the model answer replaced by h2
    for cell in student["cells"]:
        if "".join(cell["source"]).startswith("With one example per channel"):
            cell["source"] = HONEST["h2"]
    handout = json.dumps({"cells": [c for c in source_nb["cells"] if "".join(c["source"]).startswith("## Question 4")]})
    assert similarity.written_answer(student, "q4", handout) == HONEST["h2"]


def test_copies_are_flagged_and_honest_answers_are_not(source_nb):
    model = similarity.model_answer(source_nb, "q4")
    copies = _copies(model)
    answers = {"q4": dict(HONEST, **copies)}
    flags, pairs = similarity.flag_written(answers, {"q4": model})
    scores = _scores(model)
    honest = {k: v for k, v in scores.items() if set(k) <= set(HONEST) | {similarity.MODEL}}
    copied = {k: v for k, v in scores.items()
              if k in {(c, similarity.MODEL) for c in copies if c.startswith("c_model")} | {("c_peer", "h3")}}
    assert len(copied) == 4
    print("honest max %.2f %s; copies min %.2f %s" % (max(honest.values()), max(honest, key=honest.get),
                                                       min(copied.values()), min(copied, key=copied.get)))
    assert set(flags) == set(copies) | {"h3"}, flags  # h3's copier is flagged with h3 (both ways)
    assert any("the public model answer in the written answer to q4" in f for f in flags["c_model_light"])
    assert max(honest.values()) < similarity.WRITTEN_THRESHOLD - 0.2
    assert min(copied.values()) >= similarity.WRITTEN_THRESHOLD


def test_the_question_text_is_not_a_copy(source_nb):
    """Students quoting the question share its words with everyone: discarded as boilerplate."""
    question = next("".join(c["source"]) for c in source_nb["cells"] if "".join(c["source"]).startswith("## Question 4"))
    a, b = question + " " + HONEST["h1"], question + " " + HONEST["h5"]
    flags, pairs = similarity.flag_written({"q4": {"a": a, "b": b}}, {"q4": ""}, boilerplate=question)
    assert flags == {} and all(p.score < 0.1 for p in pairs)
    _, quoted = similarity.flag_written({"q4": {"a": a, "b": b}}, {"q4": ""})
    assert quoted[0].score > 0.4  # without the boilerplate the quoted question makes them look alike


def test_scores_do_not_depend_on_the_hash_seed(source_nb):
    """The shingles are compared as sets of word tuples: the same scores under PYTHONHASHSEED 0-9
    (similarity.py loaded by path in a bare interpreter: neither bnviz nor torch imported)."""
    model = similarity.model_answer(source_nb, "q4")
    texts = json.dumps(dict(HONEST, **_copies(model), **{similarity.MODEL: model}))
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('s', sys.argv[1]);"
            "s = importlib.util.module_from_spec(spec); sys.modules['s'] = s; spec.loader.exec_module(s);"
            "print(json.dumps([(p.a, p.b, round(p.score, 12)) for p in s.compare_written(json.load(sys.stdin))]))")
    outs = set()
    for seed in range(10):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        outs.add(subprocess.run([sys.executable, "-I", "-c", code, similarity.__file__], input=texts, env=env,
                                capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1 and json.loads(outs.pop()) == [[p.a, p.b, round(p.score, 12)] for p in
                                                          similarity.compare_written(json.loads(texts))]


def test_grading_flags_written_copies_and_reports_them_escaped(tmp_path, source_nb):
    """``flag_results`` (what ``grade`` calls) reads each submission's q4 answer, flags the copies in
    the gradebook flags and lists them, escaped, in similarity.html."""
    question = next(c for c in source_nb["cells"] if "".join(c["source"]).startswith("## Question 4"))
    placeholder = {"cell_type": "markdown", "metadata": {}, "source": "_Type your answer here, replacing this text._"}
    dist = tmp_path / "dist"
    (dist / "student").mkdir(parents=True)
    (dist / "autograder").mkdir()
    (dist / "student" / "batch_norm.ipynb").write_text(json.dumps({"cells": [question, placeholder]}))
    (dist / "autograder" / "batch_norm.ipynb").write_text(json.dumps(source_nb))
    (dist / "assignment.json").write_text(json.dumps({"questions": {"q1": {"manual": False, "points": 9},
                                                                    "q4": {"manual": True, "points": 2}}}))
    model = similarity.model_answer(source_nb, "q4")
    subs = tmp_path / "subs"
    subs.mkdir()
    answers = {"alice": HONEST["h1"], "bob": _copies(model)["c_model_light"], "carol": HONEST["h3"],
               "dave": "<script>alert(1)</script> " + _copies(model)["c_peer"], "erin": HONEST["h5"]}
    for name, text in answers.items():
        nb = {"cells": [question, {"cell_type": "markdown", "metadata": {}, "source": text}]}
        (subs / f"{name}.ipynb").write_text(json.dumps(nb))
    results = [{"student": n, "submission": f"{n}.ipynb", "flags": "", "notes": []} for n in answers]
    note = similarity.flag_results(results, subs, tmp_path, dist / "student" / "batch_norm.ipynb", log=lambda *a: None,
                                   codes={n: "" for n in answers})
    assert note == ""
    flags = {r["student"]: r["flags"] for r in results}
    assert "similar to the public model answer in the written answer to q4" in flags["bob"], flags
    assert "similar to dave in the written answer to q4" in flags["carol"] and "similar to carol" in flags["dave"], flags
    assert flags["alice"] == flags["erin"] == "", flags
    page = (tmp_path / "similarity.html").read_text()
    assert "Written answers" in page and "bob (q4)" in page and "<script>" not in page and "&lt;script&gt;" in page
