"""sample.py's own parts: reading the letter an answer chose, in both prompt modes, and resuming an
interrupted run from its predictions file (on conftest.py's miniature MLVU, generation scripted)."""

import json
import os
import re

import pytest
import torch

import eval as E
import grpo as G
import sample
import weights
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



# ----------------------------------------------------------------------------- the single-question command


def test_single_question_prints_generates_answer_stops_at_eos_and_honours_mode(ckpt, tmp_path, capsys):
    """`sample.py --video --question` prints what `generate` answers (greedy), for the prompt of --mode, and
    stops at eos: the model is made to emit eos a few tokens in (its output row a scaled copy of the token it
    first emits there), so a command that ran on would print more."""
    import shutil

    import data as D
    from conftest import write_video
    video = write_video(str(tmp_path / "v.mp4"), n=8)
    model, tok = sample.load(ckpt)
    pixels = D.load_video(video, num_frames=4, size=model.config.vision.image_size)[None]
    q, options = "What happens in the video?", ["red", "blue"]
    prompts = {mode: D.mc_question(q, options, mode) for mode in ("reason", "option")}
    W = model.language_model.model.embed_tokens.weight  # tied: also the output rows
    with torch.no_grad():
        for p in model.language_model.parameters():  # 20x the init, so greedy answers are not one token repeated
            p.mul_(20 if p.ndim == 2 else 1)
        ids = G.rollout(model, torch.tensor([tok.prompt_ids(prompts["option"])]), model.encode_video(pixels), -1,
                        group_size=1, max_new_tokens=12, temperature=0).completion_ids[0].tolist()
        k = next(k for k in range(3, 12) if ids[k] not in ids[:k])  # a token first emitted after 3 others
        W[tok.eos_id] = 1.05 * W[ids[k]]
    want = {m: sample.generate(model, tok, [p], pixels, max_new_tokens=12)[0] for m, p in prompts.items()}
    assert want["option"] == tok.decode(ids[:k]) != tok.decode(ids)  # generate stops at eos
    assert want["reason"] != want["option"]  # the mode changes the prompt enough to change the answer
    weights.save_pretrained(model, str(tmp_path / "ckpt"))
    shutil.copy(os.path.join(ckpt, "tokenizer.json"), tmp_path / "ckpt")
    for mode in ("option", "reason"):
        code, out, err = run(["--ckpt", str(tmp_path / "ckpt"), "--video", video, "--question", q, "--options", *options,
                              "--mode", mode, "--max-new-tokens", "12", "--frames", "4"], capsys)
        assert code == 0, err
        assert out == want[mode] + "\n", mode


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
