"""eval.py and `sample.py --bench` on miniature copies of the four benchmarks' published layouts (built in
conftest.py, frame i of every video gray 20*i), end to end on a tiny model: the readers, the clips and their
frames, the averages checked by hand; and the original evaluation protocol: each prompt byte for byte, its
answer parser on its edge cases, the frames per MVBench task type worked out by hand, and sampled, seeded,
repeatable runs. Nothing is downloaded."""

import json
import os
import sys
import types

import pytest
import torch

import data as D
import eval as E
import sample
from conftest import dump, frame_ids, mlvu, mmvu, mvbench, run, scripted, videomme, write_frames, write_gif, write_video

# ----------------------------------------------------------------------------- answers and averages


def record(task, correct, pred, n=4):
    return {"task": task, "correct": correct, "pred": pred, "num_options": n}


def test_averages_by_hand():
    records = [record("X", True, "A"), record("X", False, "B"), record("X", False, None),
               record("Y", True, "C"), record("W", False, None, n=2)]
    missing = [{"task": "X"}, {"task": "Z"}]
    micro = E.summarize(records, "task", "micro", order=["Y", "X", "Z", "W"], missing=missing)
    assert list(micro["groups"]) == ["Y", "X", "Z", "W"]
    x = micro["groups"]["X"]
    assert (x["correct"], x["total"], x["unparsed"], x["missing"]) == (1, 3, 1, 1)
    assert x["accuracy"] == pytest.approx(1 / 3) and x["guessed"] == pytest.approx((1 + 1 / 4) / 3)
    assert micro["groups"]["Z"]["accuracy"] is None and micro["groups"]["Z"]["missing"] == 1
    assert (micro["correct"], micro["total"], micro["unparsed"], micro["missing"]) == (2, 5, 2, 2)
    assert micro["average"] == pytest.approx(2 / 5)  # over items; Z has none answered
    assert micro["average_guessed"] == pytest.approx((2 + 1 / 4 + 1 / 2) / 5)
    macro = E.summarize(records, "task", "macro", missing=missing)
    assert macro["average"] == pytest.approx((1 / 3 + 1 + 0) / 3)  # mean over X, Y, W; Z is left out
    assert macro["average_guessed"] == pytest.approx(((1 + 1 / 4) / 3 + 1 + 1 / 2) / 3)
    table = E.format_table("t", macro, "task")
    assert "average (macro)" in table and " 44.4 " in table  # (1/3 + 1 + 0) / 3 = 44.4 %


# ----------------------------------------------------------------------------- clips


def test_clips_bounds_frame_folders_and_gif(tmp_path):
    video = write_video(str(tmp_path / "v.mp4"), n=12, fps=4)
    assert frame_ids(E.read_clip(video, 4)) == [0, 3, 7, 11]  # linspace(0, 11, 4), as data.sample_frames
    assert frame_ids(E.read_clip(video, 5, bound=(1.0, 2.0))) == [4, 5, 6, 7, 8]  # seconds 1-2 at 4 fps
    assert frame_ids(E.read_clip(video, 3, bound=(2.5, 100.0))) == [10, 10, 11]  # clamped to the video
    folder = write_frames(str(tmp_path / "frames"), n=9, ext="png")
    assert frame_ids(E.read_clip(folder, 4, bound=(1.0, 2.0), fps=3)) == [3, 4, 5, 6]
    assert frame_ids(E.read_clip(folder, 3)) == [0, 4, 8]
    gif = write_gif(str(tmp_path / "g.gif"), n=6)
    assert frame_ids(E.read_clip(gif, 3)) == [0, 2, 5]
    avi = write_video(str(tmp_path / "p.avi"), n=8, fps=10, fourcc="MJPG")
    assert frame_ids(E.read_clip(avi, 2, bound=(0.2, 0.5))) == [2, 5]
    clip, idx = E.load_clip(D.Sample(folder, "q", "A", {"bound": [1.0, 2.0], "fps": 3}), 4, 16)
    assert clip.shape == (4, 3, 16, 16) and clip.min() >= -1 and clip.max() <= 1
    assert torch.allclose(E.load_clip(D.Sample(video, "q", "A", {}), 4, 16)[0], D.load_video(video, 4, size=16))
    with pytest.raises(D.DataError):  # seconds in a frame folder need its frame rate
        E.read_clip(folder, 4, bound=(1.0, 2.0))
    os.makedirs(tmp_path / "empty")
    for bad in (str(tmp_path / "nope.mp4"), str(tmp_path / "empty")):
        with pytest.raises(D.VideoError):
            E.read_clip(bad, 4)


# ----------------------------------------------------------------------------- MVBench


def test_mvbench_reader(tmp_path):
    root = str(tmp_path / "MVBench")
    mvbench(root)
    samples = E.read_mvbench(root, "option")
    assert len(samples) == 21
    s = next(s for s in samples if s.meta["task"] == "Action Sequence")
    assert s.video == f"{root}/video/star/Charades_v1_480/C1.mp4"
    assert s.question == D.mc_question("Action Sequence?", ["red", "blue", "green"], "option")
    assert s.solution == "B" and s.meta["bound"] == [0.5, 2.0] and s.meta["options"] == ["red", "blue", "green"]
    assert "bound" not in next(s for s in samples if s.meta["task"] == "Action Antonym").meta
    assert "fps" not in s.meta  # a file's frame rate is read from the file
    er = next(s for s in samples if s.meta["task"] == "Episodic Reasoning")
    assert os.path.isdir(er.video) and er.meta["fps"] == 3
    # frame indices inside [0.5 s, 2 s]: at 3 fps frames 2..6 of the folder, at 4 fps frames 2..8 of the mp4
    assert frame_ids(E.read_clip(er.video, 3, er.meta["bound"], er.meta["fps"])) == [2, 4, 6]
    assert [s.solution for s in samples if s.meta["task"] == "Action Count"] == ["B", "B"]
    assert len({sample.sample_key(s) for s in samples}) == 21


def answering(monkeypatch, answers):
    """The model generates (the real path runs), then some answers are replaced by the ones given (question
    text -> answer, the longest key found in the question), so the summary can be worked out by hand."""
    real = sample.generate

    def generate(model, tok, questions, pixels, max_new_tokens=512, **kw):
        texts = real(model, tok, questions, pixels, max_new_tokens, **kw)
        keys = [max((k for k in answers if k in q), key=len, default=None) for q in questions]
        return [answers[k] if k else t for k, t in zip(keys, texts)]

    monkeypatch.setattr(sample, "generate", generate)


def test_mvbench_end_to_end(ckpt, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "MVBench")
    mvbench(root)
    tasks = list(E.MVBENCH_TASKS)
    right = set(tasks[::2])  # every item's answer is B ("blue", or "2" of Action Count's second)
    answering(monkeypatch, {**{f"{t}?": f"<answer>{'B' if t in right else 'A'}</answer>" for t in tasks},
                            "How many?": "<answer>A</answer>"})
    code, out, err = run(["--ckpt", ckpt, "--bench", "mvbench", "--root", root, "--max-new-tokens", "3",
                          "--batch-size", "8", "--device", "cpu"], capsys)
    assert code == 0, err
    assert all(task in out for task in E.MVBENCH_TASKS) and "average (micro)" in out
    assert "missing video" in err and "perception/videos/missing.mp4" in err
    preds = os.path.join(ckpt, "eval", "mvbench.reason.jsonl")
    rows = [json.loads(line) for line in open(preds)]
    assert len(rows) == 20  # 21 items, one video missing
    summary = json.load(open(os.path.join(ckpt, "eval", "mvbench.reason.summary.json")))
    assert summary["total"] == 20 and summary["missing"] == 1
    assert summary["groups"]["Object Shuffle"] == dict(correct=0, total=0, unparsed=0, missing=1, accuracy=None,
                                                        guessed=None)
    correct = len(right - {"Object Shuffle"})  # by hand; Action Count's second item is wrong
    assert summary["correct"] == sum(r["correct"] for r in rows) == correct
    assert summary["average"] == pytest.approx(correct / 20)
    for t in tasks:
        if t not in ("Object Shuffle", "Action Count"):
            assert summary["groups"][t]["accuracy"] == (1.0 if t in right else 0.0), t
    assert summary["groups"]["Action Count"]["accuracy"] == (0.5 if "Action Count" in right else 0.0)
    assert summary["unparsed"] == sum(r["pred"] is None for r in rows)
    assert next(r for r in rows if r["task"] == "Action Sequence")["bound"] == [0.5, 2.0]


def test_mvbench_layout_errors_are_one_line(ckpt, tmp_path, capsys):
    root = str(tmp_path / "MVBench")
    items = mvbench(root)
    os.remove(f"{root}/json/state_change.json")
    code, _, err = run(["--ckpt", ckpt, "--bench", "mvbench", "--root", root], capsys)
    assert code == 2 and err.count("\n") == 1 and "state_change.json" in err
    dump(f"{root}/json/state_change.json", [dict(items["State Change"][0], answer="purple")])
    code, _, err = run(["--ckpt", ckpt, "--bench", "mvbench", "--root", root], capsys)
    assert code == 2 and err.count("\n") == 1 and "state_change.json item 0" in err and "purple" in err
    code, _, err = run(["--ckpt", ckpt, "--bench", "mvbench"], capsys)
    assert code == 2 and "--root" in err
    code, _, err = run(["--ckpt", ckpt, "--bench", "mvbench", "--root", root, "--eval", "x.jsonl"], capsys)
    assert code == 2 and "not both" in err


# ----------------------------------------------------------------------------- Video-MME


def test_videomme_per_duration(ckpt, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "Video-MME")
    videomme(root)
    s = E.read_videomme(root, "reason")[0]
    assert s.question == D.mc_question("q0", ["one.", "two.", "three.", "four."], "reason") and s.solution == "A"
    # short: right, unparsed; medium: right; long: wrong (and one missing video)
    scripted(monkeypatch, {"q0": "<think>.</think><answer>A</answer>", "q1": "I cannot tell",
                           "q2": "<answer>C. three.</answer>", "q3": "<answer>A</answer>"})
    preds = str(tmp_path / "vm.jsonl")
    code, out, err = run(["--ckpt", ckpt, "--bench", "videomme", "--root", root, "--predictions", preds], capsys)
    assert code == 0, err
    summary = json.load(open(str(tmp_path / "vm.summary.json")))
    assert list(summary["groups"]) == ["short", "medium", "long"]
    g = summary["groups"]
    assert (g["short"]["correct"], g["short"]["total"], g["short"]["unparsed"]) == (1, 2, 1)
    assert (g["medium"]["accuracy"], g["long"]["accuracy"], g["long"]["missing"]) == (1.0, 0.0, 1)
    assert summary["average"] == pytest.approx(2 / 4) and summary["average_guessed"] == pytest.approx(2.25 / 4)
    assert "average (micro)" in out and "vid4.mp4" in err
    # option mode reads the letter the model says
    scripted(monkeypatch, {"q0": "B", "q1": "B. two.", "q2": "D", "q3": "D"})
    code, out, err = run(["--ckpt", ckpt, "--bench", "videomme", "--root", root, "--mode", "option",
                          "--predictions", str(tmp_path / "vmo.jsonl")], capsys)
    assert code == 0, err
    assert json.load(open(str(tmp_path / "vmo.summary.json")))["correct"] == 2  # q1 (B) and q3 (D)


def test_videomme_parquet(tmp_path, monkeypatch, capsys, ckpt):
    root = str(tmp_path / "Video-MME")
    rows = videomme(root)
    os.remove(f"{root}/videomme/test.json")
    (tmp_path / "Video-MME" / "videomme" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(["--ckpt", ckpt, "--bench", "videomme", "--root", root], capsys)
    assert code == 2 and err == "sample.py: Video-MME ships parquet: pip install pyarrow\n"
    # with a parquet reader present, its rows are what is read
    table = types.SimpleNamespace(to_pylist=lambda: rows)
    pq = types.SimpleNamespace(read_table=lambda path: table)
    monkeypatch.setitem(sys.modules, "pyarrow", types.SimpleNamespace(parquet=pq))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    samples = E.read_videomme(root, "reason")
    assert [s.meta["duration"] for s in samples] == ["short", "short", "medium", "long", "long"]
    assert [s.solution for s in samples] == list("ABCDA")


# ----------------------------------------------------------------------------- MLVU


def test_mlvu_macro_average(ckpt, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "MLVU")
    mlvu(root)
    samples = E.read_mlvu(root, "reason")
    assert [s.meta["task"] for s in samples] == ["plotQA", "plotQA", "needle", "ego", "count", "order",
                                                 "anomaly_reco", "topic_reasoning"]
    assert samples[0].video == f"{root}/video/1_plotQA/plotQA.mp4"
    assert samples[-1].video == f"{root}/video/topic_reasoning/topic_reasoning.mp4"
    # plotQA 1 of 2 right, needle right, the 5 others wrong: macro (0.5 + 1) / 7, micro 2 / 8
    right, wrong = "<answer>A</answer>", "<answer>B</answer>"
    scripted(monkeypatch, {**{s.meta["task"]: wrong for s in samples}, "plotQA 0": right, "needle 0": right})
    code, out, err = run(["--ckpt", ckpt, "--bench", "mlvu", "--root", root, "--predictions",
                          str(tmp_path / "mlvu.jsonl")], capsys)
    assert code == 0, err
    summary = json.load(open(tmp_path / "mlvu.summary.json"))
    assert summary["average_kind"] == "macro" and summary["average"] == pytest.approx(1.5 / 7)
    assert summary["correct"] == 2 and summary["total"] == 8
    assert "average (macro)" in out and " 21.4 " in out


# ----------------------------------------------------------------------------- MMVU


def test_mmvu_end_to_end(ckpt, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "MMVU")
    mmvu(root)
    samples = E.read_mmvu(root, "reason")
    assert [s.meta["line"] for s in samples] == ["validation_1", "validation_2", "validation_3"]  # multiple choice only
    assert samples[0].video == f"{root}/videos/Chemistry/0.mp4" and samples[1].video == f"{root}/videos/Art/0.mp4"
    assert [s.solution for s in samples] == ["A", "E", "C"] and samples[0].meta["subject"] == "Chemistry"
    preds = str(tmp_path / "mmvu.jsonl")
    answering(monkeypatch, {"How many grams?": "<answer>A</answer>", "Which style?": "<answer>B</answer>"})
    code, out, err = run(["--ckpt", ckpt, "--bench", "mmvu", "--root", root, "--predictions", preds,
                          "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(preds)]
    assert len(rows) == 2 and {r["subject"] for r in rows} == {"Chemistry", "Art"}
    summary = json.load(open(tmp_path / "mmvu.summary.json"))
    assert summary["missing"] == 1 and summary["groups"]["Art"]["missing"] == 1
    assert summary["average"] == 0.5 and summary["groups"]["Chemistry"]["accuracy"] == 1.0  # A right, E not B
    assert summary["groups"]["Art"]["accuracy"] == 0.0
    assert "Chemistry" in out and "Art/9.mp4" in err
    other = str(tmp_path / "MMVU-github")  # the GitHub repository keeps the file in data/
    mmvu(other, "data/validation.json")
    assert len(E.read_mmvu(other, "option")) == 3


# ============================================================================= the original protocol

SUFFIX = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def by(samples, **meta):
    return next(s for s in samples if all(s.meta.get(k) == v for k, v in meta.items()))


# ----------------------------------------------------------------------------- prompts, byte for byte


def test_mvbench_prompt(tmp_path):
    root = str(tmp_path / "MVBench")
    mvbench(root)
    dump(f"{root}/json/action_antonym.json", [{"video": "1.gif", "question": "What did he do? ",
                                               "candidates": ["stop", "go \n"], "answer": "go \n"}])
    samples = E.read_mvbench(root, "reason", "original")
    s = by(samples, task="Action Sequence")
    assert D.build_prompt(s.question) == (
        SYSTEM + " USER: <image>\nAction Sequence?\nOptions:\nA. red\nB. blue\nC. green\n" + SUFFIX + " ASSISTANT:")
    assert s.solution == "B" and s.meta["choices"] == ["A", "B", "C"]
    # only the end of the whole body is stripped (the question's own trailing space stays)
    assert by(samples, task="Action Antonym").question == "What did he do? \nOptions:\nA. stop\nB. go\n" + SUFFIX
    clean = by(E.read_mvbench(root, "reason"), task="Action Sequence")  # the clean protocol is unchanged
    assert clean.question == "Action Sequence?\nA. red\nB. blue\nC. green\n" + SUFFIX and "choices" not in clean.meta


def test_videomme_mlvu_mmvu_prompts(tmp_path):
    videomme(str(tmp_path / "vm"))
    s = E.read_videomme(str(tmp_path / "vm"), "reason", "original")[2]
    assert s.question == "q2\nOptions:\nA. one.\nB. two.\nC. three.\nD. four.\n" + SUFFIX
    assert s.solution == "C" and s.meta["choices"] == ["A", "B", "C", "D"]

    mlvu(str(tmp_path / "mlvu"))
    s = E.read_mlvu(str(tmp_path / "mlvu"), "reason", "original")[1]
    assert s.question == "plotQA 1\n(A) yes\n(B) no\n" + SUFFIX and s.solution == "A"

    mmvu(str(tmp_path / "mmvu"))
    path = str(tmp_path / "mmvu" / "validation.json")
    items = json.load(open(path))
    items[2]["choices"] = {"A": "oil", "B": "", "C": "ink"}  # an empty choice is still listed, as the original did
    items[2]["answer"] = "C"
    dump(path, items)
    first, second, _ = E.read_mmvu(str(tmp_path / "mmvu"), "reason", "original")
    assert first.question == "How many grams?\nA. 10.0\nB. 5.0\nC. 12.0\nD. 15.0\nE. 20.0\n" + SUFFIX
    assert second.question == "Which style?\nA. oil\nB. \nC. ink\n" + SUFFIX
    assert second.solution == "C" and second.meta["choices"] == ["A", "B", "C"]
    assert E.read_mmvu(str(tmp_path / "mmvu"), "reason")[1].solution == "B"  # clean: the empty one is dropped


# ----------------------------------------------------------------------------- the parser


class Guess:
    """Stands in for random.Random: says what it was asked to choose from."""
    def choice(self, choices):
        return "guess from " + "".join(choices)


@pytest.mark.parametrize("text,want", [
    ("<think>x</think> <answer>B</answer>", ("B", False)),
    ("<answer>  c. green </answer>", ("C", False)),  # lower case, returned upper case
    ("<answer>\nB\n</answer>", ("B", False)),  # \s* takes the newlines around the answer
    ("<answer>(c) green</answer>", ("C", False)),  # "(x)" anywhere in the answer
    ("<answer>It is (B), not (A)</answer>", ("A", False)),  # the first choice in choice order, not in the text
    ("<answer>Answer: (C)</answer>", ("A", False)),  # its first character "A" is a choice letter
    ("<answer>The answer is (D)</answer>", ("D", False)),  # "T" is not one; D is
    ("<answer></answer>", (None, False)),  # empty: no answer, counted wrong
    ("<answer>   </answer><answer>B</answer>", (None, False)),  # only the first <answer> is read
    ("<answer>B\nC</answer>", ("guess from ABCD", True)),  # the dot does not cross a newline: no match
    ("<think>the ball rolls</think> B", ("guess from ABCD", True)),  # no tags
    ("<answer>E</answer>", ("guess from ABCD", True)),  # not a choice
    ("<answer>blue</answer>", ("B", False)),  # its first character, in lower case, reads as B
    ("<answer>yes</answer>", ("guess from ABCD", True)),
])
def test_original_parser_edge_cases(text, want):
    assert E.parse_original(text, ["A", "B", "C", "D"], Guess()) == want


# ----------------------------------------------------------------------------- frames per MVBench task type


def test_mvbench_frames_per_task_type(tmp_path):
    """16 frames, as published. By hand: linspace(0, 11, 16) over a 12-frame file; segment midpoints
    int(start + seg/2 + round(seg*i)), seg = (end - start)/16, rounding halves to even as numpy does."""
    root = str(tmp_path / "MVBench")
    mvbench(root)
    samples = E.read_mvbench(root, "reason", "original")

    def ids(task):
        s = by(samples, task=task)
        return frame_ids(E.read_clip(s.video, 16, s.meta.get("bound"), s.meta.get("fps"), s.meta["frames_rule"]))

    # plain video, bounds (0.5 s, 2 s) ignored: the whole 12-frame clip, 11/15 apart, truncated
    whole = [0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11]
    for task in ("Action Sequence", "Action Prediction", "Object Interaction"):
        assert ids(task) == whole
    clean = by(E.read_mvbench(root, "reason"), task="Action Sequence")  # clean: frames 2..8 (0.5 s..2 s at 4 fps)
    assert frame_ids(E.read_clip(clean.video, 16, clean.meta["bound"])) == [2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8]
    # .avi (Fine-grained Pose), 12 frames: start 0, end 11, seg 0.6875; i = 8: round(5.5) = 6
    assert ids("Fine-grained Pose") == [0, 1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10]
    # .webm (Action Antonym; a gif here), 6 frames: seg 0.3125; i = 8: round(2.5) = 2, not 3
    assert ids("Action Antonym") == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    # frame folder (Episodic Reasoning), 9 files at 3 fps, 0.5 s..2 s: frames numbered round(1.5) = 2 to
    # min(round(6.0), 9) = 6, seg 0.25, round(0.5) = 0 and round(2.5) = 2; files 00002.jpg.. are indices 1..
    assert ids("Episodic Reasoning") == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5]
    # every other task: the whole file (6 frames here)
    assert ids("Moving Count") == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]


def test_videomme_mlvu_unique_and_mmvu_uniform_frames(tmp_path):
    videomme(str(tmp_path / "vm"))
    s = E.read_videomme(str(tmp_path / "vm"), "reason", "original")[0]  # 8 frames: linspace repeats, unique not
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 1, 2, 3, 4, 5, 6, 7]
    mlvu(str(tmp_path / "mlvu"))
    s = E.read_mlvu(str(tmp_path / "mlvu"), "reason", "original")[0]
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 1, 2, 3, 4, 5]
    mmvu(str(tmp_path / "mmvu"))
    s = E.read_mmvu(str(tmp_path / "mmvu"), "reason", "original")[0]
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


# ----------------------------------------------------------------------------- end to end


def test_original_protocol_end_to_end_is_sampled_seeded_and_audited(ckpt, tmp_path, capsys):
    """A tiny random model answers MMVU twice (--samples 2): each run its own seed and file, every record
    with the prompt and frames; the same seed gives the same answers, another seed others."""
    root = str(tmp_path / "MMVU")
    mmvu(root)
    preds = str(tmp_path / "mmvu.jsonl")
    argv = ["--ckpt", ckpt, "--bench", "mmvu", "--root", root, "--protocol", "original", "--max-new-tokens", "12",
            "--predictions", preds, "--device", "cpu"]
    code, out, err = run(argv + ["--samples", "2", "--seed", "5"], capsys)
    assert code == 0, err
    runs = [[json.loads(line) for line in open(tmp_path / f"mmvu.seed{s}.jsonl")] for s in (5, 6)]
    asked = E.read_mmvu(root, "reason", "original")[:2]  # the third video is missing
    for rows in runs:
        assert [r["prompt"] for r in rows] == [D.build_prompt(s.question) for s in asked]
        assert all(r["frames"] == [0, 2, 4, 7] and r["choices"] == list("ABCDE") for r in rows)  # 4 of 8 frames
        assert all(r["pred"] in list("ABCDE") + [None] for r in rows)
    assert [r["output"] for r in runs[0]] != [r["output"] for r in runs[1]]
    summaries = [json.load(open(tmp_path / f"mmvu.seed{s}.summary.json")) for s in (5, 6)]
    assert [s["protocol"] for s in summaries] == ["original"] * 2 and summaries[1]["seed"] == 6
    both = json.load(open(tmp_path / "mmvu.summary.json"))
    assert both["seeds"] == [5, 6] and both["averages"] == [s["average"] for s in summaries]
    assert both["mean"] == pytest.approx(sum(both["averages"]) / 2)
    assert both["std"] == pytest.approx(abs(both["averages"][0] - both["averages"][1]) / 2 ** 0.5)
    assert "mean +- std over runs" in out
    # the same command again (a fresh file): the same answers and the same guesses
    code, _, err = run(argv[:-4] + ["--device", "cpu", "--predictions", str(tmp_path / "again.jsonl"), "--seed", "5"], capsys)
    assert code == 0, err
    again = [json.loads(line) for line in open(tmp_path / "again.seed5.jsonl")]
    assert [(r["output"], r["pred"]) for r in again] == [(r["output"], r["pred"]) for r in runs[0]]


def test_original_protocol_decoding_settings_and_guesses(ckpt, tmp_path, monkeypatch, capsys):
    """The generation settings reach generate; an unreadable answer is a seeded random guess (the same on a
    rerun, counted as unparsed); an empty one is wrong; default file names carry the protocol and seed."""
    root = str(tmp_path / "MLVU")
    mlvu(root)
    calls = []

    def generate(model, tok, questions, pixels, max_new_tokens=512, **kw):
        calls.append((max_new_tokens, {k: v for k, v in kw.items() if k not in ("generator", "decode")}, type(kw.get("generator"))))
        return ["<answer></answer>" if "plotQA 0" in q else "I think it is yes" for q in questions]

    monkeypatch.setattr(sample, "generate", generate)
    argv = ["--ckpt", ckpt, "--bench", "mlvu", "--root", root, "--protocol", "original"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert calls and all(c == (1024, dict(temperature=1.0, top_k=50, top_p=1.0), sample.torch.Generator) for c in calls)
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))]
    empty = next(r for r in rows if r["line"] == "1_plotQA:0")
    assert empty["pred"] is None and not empty["guessed"] and not empty["correct"]
    guesses = [r for r in rows if r is not empty]
    assert all(r["guessed"] and r["pred"] in ("A", "B") for r in guesses)
    summary = json.load(open(os.path.join(ckpt, "eval", "mlvu.original.seed0.summary.json")))
    assert summary["unparsed"] == 8 and summary["correct"] == sum(r["pred"] == "A" for r in guesses)
    os.remove(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))
    assert run(argv, capsys)[0] == 0
    rerun = [json.loads(line) for line in open(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))]
    assert [r["pred"] for r in rerun] == [r["pred"] for r in rows]
    assert [run(argv + ["--seed", str(s)], capsys)[0] for s in (1, 2, 3)] == [0, 0, 0]
    preds = {s: [json.loads(line)["pred"] for line in open(os.path.join(ckpt, "eval", f"mlvu.original.seed{s}.jsonl"))]
             for s in (1, 2, 3)}
    assert len({tuple(p) for p in preds.values()} | {tuple(r["pred"] for r in rows)}) > 1  # other seeds, other guesses


def test_original_protocol_usage_errors(ckpt, tmp_path, capsys):
    root = str(tmp_path / "MLVU")
    mlvu(root)
    for extra in (["--protocol", "original", "--mode", "option"], ["--samples", "2"], ["--samples", "0"]):
        code, _, err = run(["--ckpt", ckpt, "--bench", "mlvu", "--root", root] + extra, capsys)
        assert code == 2 and err.count("\n") == 1, extra
    code, _, err = run(["--ckpt", ckpt, "--eval", "x.jsonl", "--protocol", "original"], capsys)
    assert code == 2 and "--protocol original is for --bench" in err
