"""sample.py's own parts: reading the letter an answer chose, in both prompt modes, and resuming an
interrupted run from its predictions file (on conftest.py's miniature MLVU, generation scripted)."""

import json

import pytest

import eval as E
import sample
from conftest import mlvu, run, scripted


@pytest.mark.parametrize("text,mode,want", [
    ("<think>the ball rolls</think> <answer>B</answer>", "reason", "B"),
    ("<think>x</think><answer>(C) blue</answer>", "reason", "C"),
    ("<think>x</think><answer>\nD. none\n</answer>", "reason", "D"),
    ("<think>A is wrong</think><answer>E</answer>", "reason", None),  # only A-D exist
    ("<think>x</think> B", "reason", None),  # no <answer> tags: unparseable in reason mode
    ("<answer>b</answer>", "reason", None),  # lower case is not read as a letter
    ("B", "option", "B"),
    ("(C) the cat", "option", "C"),
    ("The answer is D.", "option", "D"),
    ("E", "option", None),
    ("none of them", "option", None),
])
def test_parse_answer_in_both_modes(text, mode, want):
    assert sample.parse_answer(text, 4, mode) == want


def test_mlvu_resumes_a_partial_run(ckpt, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "MLVU")
    mlvu(root)
    answers = {s.meta["task"]: "<answer>A</answer>" for s in E.read_mlvu(root, "reason")}
    calls = []
    scripted(monkeypatch, answers, calls)
    preds = str(tmp_path / "mlvu.jsonl")
    argv = ["--ckpt", ckpt, "--bench", "mlvu", "--root", root, "--predictions", preds, "--batch-size", "3"]
    assert run(argv, capsys)[0] == 0
    assert calls == [3, 3, 2]
    first = json.load(open(tmp_path / "mlvu.summary.json"))
    lines = open(preds).read().splitlines()
    with open(preds, "w") as f:  # interrupted after 5 answers, the 6th line cut short
        f.write("\n".join(lines[:5]) + "\n" + lines[5][:20])
    calls.clear()
    assert run(argv, capsys)[0] == 0
    assert calls == [3]  # only the 3 unanswered items are asked again
    assert json.load(open(tmp_path / "mlvu.summary.json")) == first and first["average"] == 1.0

