"""demo.py: the synthetic task (deterministic, balanced, its answers really in the frames) and the
demo's own command `python demo.py`, shortened; its fact checker."""

import collections
import json
import os
import shlex

import numpy as np
import pytest

import data as D
import demo
import model as M
import sample


def test_synthetic_task_is_deterministic_balanced_and_readable(tmp_path):
    a = demo.make_synthetic(str(tmp_path / "a"), n_train=48, n_coldstart=8, n_test=16, seed=3)
    b = demo.make_synthetic(str(tmp_path / "b"), n_train=48, n_coldstart=8, n_test=16, seed=3)
    for key in ("grpo", "coldstart", "heldout", "test"):
        assert open(a[key]).read() == open(b[key]).read()
    rows = [json.loads(line) for line in open(a["grpo"])]
    video = os.path.join(a["root"], rows[0]["video_filename"])
    assert np.array_equal(D.sample_frames(video, 8), D.sample_frames(os.path.join(b["root"], rows[0]["video_filename"]), 8))
    counts = collections.Counter((r["task"], r["solution"]) for r in rows)
    assert len(counts) == 16 and max(counts.values()) - min(counts.values()) <= 1  # every task x letter
    cold = D.read_samples(a["coldstart"])[0]
    assert all(s.solution.startswith("<think>") and s.solution.endswith("</answer>") for s in cold)
    test = D.read_samples(a["test"])[0]
    held = D.read_samples(a["heldout"])[0]
    assert [s.video for s in test] == [s.video for s in held]
    assert not {s.video for s in test} & {os.path.join(a["root"], r["video_filename"]) for r in rows}
    c = demo.make_synthetic(str(tmp_path / "c"), n_train=48, n_coldstart=8, n_test=16, seed=4)
    assert open(c["grpo"]).read() != open(a["grpo"]).read()


@pytest.mark.parametrize("task", list(demo.TASKS))
def test_synthetic_answers_are_in_the_frames(task):
    rng = np.random.RandomState(0)
    for k, answer in enumerate(demo.TASKS[task][1]):
        frames, why = demo.render(task, answer, rng)
        drawn = (frames != demo.background()).any(-1)  # object pixels: what differs from the empty scene
        lit = drawn.reshape(len(frames), -1)
        if task == "count":
            assert (lit.sum(1) > 0).sum() == int(answer)
        elif task == "direction":
            xs = [np.nonzero(d) for d in drawn]
            centre = np.array([[x[1].mean(), x[0].mean()] for x in xs])
            assert np.sign(centre[-1] - centre[0]).tolist() == [float(v) for v in demo.DIRECTIONS[answer]]
        elif task == "order":
            t = np.argmax(lit.sum(1) > 0)
            rgb = frames[t][drawn[t]][0][::-1]  # BGR -> RGB
            assert np.array_equal(rgb, demo.COLOURS[answer])
        assert answer in why


@pytest.mark.slow  # the whole demo, shortened
@pytest.mark.usefixtures("one_thread")
def test_demo_shortened_and_its_model_answers_the_command_line(tmp_path, monkeypatch, capsys):
    """`python demo.py --reward-reasoning`, at a few steps per stage: data, tokenizer, base, SFT, GRPO (scored on the
    held-out file as it goes), evaluation with the reasoning checked; then the printed ask command gives the answer
    the evaluation gave to the same row (the same prompt: one format from the cold start to the command line)."""
    small = dict(frames=8, n_train=16, n_coldstart=8, n_test=8, n_captions=16,
                 base=dict(lr=1e-3, steps=2, prompts_per_step=8, micro_batch=8),
                 sft=dict(lr=1e-3, steps=2, prompts_per_step=4, micro_batch=4),
                 grpo=dict(lr=1e-4, steps=2, prompts_per_step=4, micro_batch=4, group_size=4, max_new_tokens=8, beta=0.01, eval_every=1))
    monkeypatch.setattr(demo, "DEMO", small)
    assert demo.main(["--out", str(tmp_path), "--seed", "3", "--reward-reasoning"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) >= {"sft_accuracy", "grpo_accuracy", "per_task", "seconds", "reasoning_accuracy", "answer_agrees_with_reasoning"}
    per_task = summary["per_task"]
    assert set(per_task) == {"sft", "grpo"} and set(per_task["sft"]) == set(per_task["grpo"]) and set(per_task["sft"]) <= set(demo.TASKS)
    for name in ("reasoning_accuracy", "answer_agrees_with_reasoning"):
        assert set(summary[name]) == {"sft", "grpo"} and set(summary[name]["grpo"]) == set(per_task["grpo"]) | {"all"}
    assert all(0 <= a <= 1 for stage in per_task.values() for a in stage.values())
    assert "one held-out question" in out and "cold start:" in out and "GRPO:" in out
    assert 0 <= summary["sft_accuracy"] <= 1 and 0 <= summary["grpo_accuracy"] <= 1 and summary["n_test"] == 8
    for stage in ("sft", "grpo"):  # the accuracies are those of the stage's checkpoint, asked through sample.py
        preds = str(tmp_path / f"{stage}.predictions.jsonl")
        assert sample.main(["--ckpt", str(tmp_path / stage / "checkpoint"), "--eval", str(tmp_path / "data" / "heldout.jsonl"),
                            "--frames", "8", "--max-new-tokens", "8", "--batch-size", "50", "--predictions", preds]) == 0
        rows = [json.loads(line) for line in open(preds)]
        assert len(rows) == 8 and summary[f"{stage}_accuracy"] == sum(r["correct"] for r in rows) / 8
        assert per_task[stage] == {t: round(sum(r["correct"] for r in rows if r["task"] == t) /
                                            sum(r["task"] == t for r in rows), 3) for t in {r["task"] for r in rows}}
    for stage in ("base", "sft", "grpo"):
        assert (tmp_path / stage / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "grpo" / "curves.png").exists()
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert all("eval/accuracy" in r and "eval/reasoning_accuracy" in r and "reward/reasoning" in r for r in rows)
    config = M.TinyLLaVAConfig.from_dict(json.load(open(tmp_path / "grpo" / "checkpoint" / "config.json")))
    assert config.connector.connector_type == "groupresampler" and config.connector.group == small["frames"]  # one group a frame

    # every stage's prompts are the evaluation's (the command line's) prompts
    data = tmp_path / "data"
    cli = lambda s: D.mc_question(s.question.split("\n")[0], s.meta["options"])  # noqa: E731
    assert all(s.question == cli(s) for f in ("train.jsonl", "test.jsonl") for s in D.read_samples(str(data / f))[0])
    cold = D.read_samples(str(data / "coldstart.json"))[0]
    assert all(s.question.endswith(D.REASON_SUFFIX) and "\nA. " in s.question for s in cold)
    capsys.readouterr()  # what the evaluations above printed
    ask = shlex.split(out.split("ask the GRPO model a question of your own:")[1].strip().splitlines()[0])
    assert ask[:2] == ["python", "sample.py"]
    assert sample.main(ask[2:] + ["--max-new-tokens", "8"]) == 0
    answered = capsys.readouterr().out.strip()
    video = ask[ask.index("--video") + 1]
    test = D.read_samples(str(data / "test.jsonl"))[0]
    model, tok = sample.load(str(tmp_path / "grpo" / "checkpoint"), "cpu")
    row = sample.evaluate(model, tok, [s for s in test if s.video == video], batch_size=1, frames=8, max_new_tokens=8, progress=False)
    assert answered == row["records"][0]["output"].strip()


@pytest.mark.parametrize("task", list(demo.TASKS))
def test_fact_checker_on_written_reasoning(task):
    options = demo.TASKS[task][1]
    right, wrong = options[2], options[0]  # the answer is C
    _, why = demo.render(task, right, np.random.RandomState(0))
    _, why_wrong = demo.render(task, wrong, np.random.RandomState(0))
    check = lambda think, pred: sample.check_reasoning(f"<think>{think}</think> <answer>{pred}</answer>", demo.FACTS[task],  # noqa: E731
                                                       options, "C", pred)
    assert check(why, "C") == (True, True)  # right fact, agreeing letter
    assert check(why, "A") == (True, False)  # right fact, the letter of another option
    assert check(why_wrong, "A") == (False, True)  # the wrong fact, and the letter it implies
    assert check("I looked at the video.", "C") == (False, False)  # no fact stated
    assert check(why + " " + why_wrong, "C") == (False, False)  # two facts: not a statement of the true one
    assert sample.check_reasoning(f"{why} <answer>C</answer>", demo.FACTS[task], options, "C", "C") == (False, False)  # no <think>
    assert demo.reasoning_reward(f"<think>{why}</think> <answer>A</answer>", "C") == 1.0
    assert demo.reasoning_reward(f"<think>{why_wrong}</think> <answer>C</answer>", "C") == 0.0
    assert demo.reasoning_reward(f"<think>{why} {why_wrong}</think> <answer>C</answer>", "C") == 0.0
