"""sample.py's own parts: reading the letter an answer chose, in both prompt modes, and resuming an
interrupted run from its predictions file (on conftest.py's miniature MLVU, generation scripted)."""

import json
import re

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



@pytest.mark.parametrize("uses_thinking", [False, True])
def test_reasoning_probe(ckpt, tmp_path, monkeypatch, capsys, uses_thinking):
    """--probe-reasoning on a scripted model: one whose letter cannot depend on its thinking keeps it under every
    edit (rates 1.0); one that reads its letter from its thinking ("it is B") loses it (rates below 1)."""
    root = str(tmp_path / "MLVU")
    mlvu(root)
    tasks = sorted({s.meta["task"] for s in E.read_mlvu(root, "reason")})
    answers = {t: f"<think>The {t} clip shows it is {'BCD'[i % 3]}</think> <answer>{'BCD'[i % 3]}</answer>" for i, t in enumerate(tasks)}
    calls = []

    def generate(model, tok, questions, pixels, max_new_tokens=512, prefills=None, **kw):
        calls.append((len(questions), prefills is not None))
        first = [answers[max((k for k in answers if k in q), key=len)] for q in questions]
        if prefills is None:
            return first
        assert max_new_tokens <= 8 and all(p.endswith("</think> <answer") for p in prefills)
        said = [re.search(r"it is ([A-D])", p) for p in prefills]
        return [f">{(s.group(1) if s else 'A') if uses_thinking else sample.parse_answer(f)}</answer>" for s, f in zip(said, first)]

    monkeypatch.setattr(sample, "generate", generate)
    preds = str(tmp_path / "mlvu.jsonl")
    code, out, _ = run(["--ckpt", ckpt, "--bench", "mlvu", "--root", root, "--predictions", preds, "--batch-size", "3",
                        "--probe-reasoning"], capsys)
    assert code == 0 and "reasoning probe" in out
    assert [n for n, prefilled in calls if not prefilled] == [3, 3, 2]  # the re-asks: one batch per batch
    assert sum(prefilled for _, prefilled in calls) == 3
    probe = json.load(open(tmp_path / "mlvu.summary.json"))["reasoning_probe"]
    assert probe["probed"] == 8 and probe["counts"] == {"removed": 8, "half": 8, "swapped": 8}
    if uses_thinking:
        assert probe["same_letter"]["removed"] == 0.0 and probe["same_letter"]["half"] == 0.0
        assert probe["same_letter"]["swapped"] < 1.0
    else:
        assert probe["same_letter"] == {"removed": 1.0, "half": 1.0, "swapped": 1.0}
