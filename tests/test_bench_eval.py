"""sample.py --bench on miniature copies of the four benchmarks' published layouts, built here with
synthetic videos (frame i of every video is flat gray 20*i, so a sampled frame tells its index), end to end
on a tiny model; the averages checked by hand; answer parsing in both modes. Nothing is downloaded."""

import json
import os
import shutil
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import eval as E
import model as M
import sample

STEP = 20  # gray level step between consecutive frames


def write_video(path, n=12, fps=4, fourcc="mp4v"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (16, 16))
    for i in range(n):
        w.write(np.full((16, 16, 3), STEP * i, np.uint8))
    w.release()
    return path


def write_gif(path, n=6):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = [Image.fromarray(np.full((16, 16, 3), STEP * i, np.uint8)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def write_frames(folder, n=9, ext="png"):
    """A folder of frame images named 00001.ext, 00002.ext... as MVBench's frame folders are."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        cv2.imwrite(os.path.join(folder, f"{i + 1:05d}.{ext}"), np.full((16, 16, 3), STEP * i, np.uint8))
    return folder


def frame_ids(clip):
    """read_clip's ((T, H, W, 3) uint8, indices) -> the index of each frame, read from its gray level (and
    checked against the indices it reports)."""
    frames, idx = clip
    ids = [int(round(f.mean() / STEP)) for f in frames]
    assert ids == list(idx)
    return ids


def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random TinyLLaVA-Video saved in the published layout with a tokenizer beside it."""
    root = tmp_path_factory.mktemp("ckpt")
    texts = ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
             D.REASON_SUFFIX, D.OPTION_SUFFIX, "<think> the video shows </think> <answer> A B C D E </answer>",
             "What happens in the video? Which object moves first? A. red B. blue C. green D. none"]
    tok = D.train_tokenizer(texts * 4, str(root / "tokenizer.json"), vocab_size=300)
    torch.manual_seed(0)  # the resampler keeps the published 8 heads of 64: config.json does not record them
    cfg = M.TinyLLaVAConfig(
        vision=M.VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8),
        connector=M.ConnectorConfig(num_queries=4, group=2, num_resampler_layers=1, vision_hidden_size=32, hidden_size=32),
        text=M.TextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        raw={"num_frames": 4})
    out = root / "model"
    M.TinyLLaVA(cfg).save_pretrained(str(out))
    shutil.copy(root / "tokenizer.json", out / "tokenizer.json")
    return str(out)


def scripted(monkeypatch, answers, calls=None):
    """Replace generation by fixed completions, chosen by the longest key found in each question, to check
    the arithmetic through the whole command; the pixels must still be the model's input shape."""
    def generate(model, tok, questions, pixels, max_new_tokens=512, **kw):
        assert pixels.shape[:3] == (len(questions), 4, 3) and pixels.shape[-1] == 16
        if calls is not None:
            calls.append(len(questions))
        return [answers[max((k for k in answers if k in q), key=len)] for q in questions]
    monkeypatch.setattr(sample, "generate", generate)


def run(argv, capsys):
    code = sample.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- answers and averages


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


def mvbench(root):
    """All 20 task files, one item each (two for Action Count), in MVBench's folders; Object Shuffle's video
    is missing. Frame i of every video is gray 20*i."""
    v = os.path.join(root, "video")
    write_video(f"{v}/star/Charades_v1_480/C1.mp4", n=12, fps=4)
    write_gif(f"{v}/ssv2_video/1.gif")
    write_video(f"{v}/nturgbd/S001.avi", fourcc="MJPG")
    write_frames(f"{v}/tvqa/frames_fps3_hq/ep1", n=9, ext="jpg")
    items = {}
    for task, (file, folder, bounded) in E.MVBENCH_TASKS.items():
        name = {"star/Charades_v1_480": "C1.mp4", "ssv2_video": "1.gif", "nturgbd": "S001.avi",
                "tvqa/frames_fps3_hq": "ep1"}.get(folder, "clip.mp4")
        if task == "Object Shuffle":
            name = "missing.mp4"
        elif name == "clip.mp4":
            write_video(f"{v}/{folder}/clip.mp4", n=6)
        item = {"video": name, "question": f"{task}?", "candidates": ["red", "blue", "green"], "answer": "blue"}
        if bounded:
            item.update(start=0.5, end=2.0)
        items[task] = [item]
        if task == "Action Count":
            items[task].append(dict(item, question="How many?", candidates=["1", "2"], answer="2"))
        dump(f"{root}/json/{file}", items[task])
    return items


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


def test_mvbench_end_to_end(ckpt, tmp_path, capsys):
    root = str(tmp_path / "MVBench")
    mvbench(root)
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
    assert summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["average"] == pytest.approx(sum(r["correct"] for r in rows) / 20)
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


def videomme(root):
    """A JSON export of Video-MME's rows (the parquet's columns), videos in data/; one long video is missing."""
    rows = []
    for i, duration in enumerate(["short", "short", "medium", "long", "long"]):
        vid = f"vid{i}"
        if i != 4:
            write_video(f"{root}/data/{vid}.mp4", n=8)
        rows.append({"video_id": f"{i:03d}", "duration": duration, "domain": "Sports", "videoID": vid,
                     "question_id": f"{i:03d}-1", "task_type": "Counting Problem", "question": f"q{i}",
                     "options": ["A. one.", "B. two.", "C. three.", "D. four."], "answer": "ABCDA"[i]})
    dump(f"{root}/videomme/test.json", rows)
    return rows


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


def mlvu(root):
    """The 7 task files; videos under video/<k>_<task>/ for the first four, video/<task>/ for the others."""
    for k, name in enumerate(E.MLVU_TASKS):
        task = name.split("_", 1)[1]
        write_video(f"{root}/video/{name if k < 4 else task}/{task}.mp4", n=6)
        items = [{"video": f"{task}.mp4", "duration": 10, "question": f"{task} {j}", "candidates": ["yes", "no"],
                  "answer": "yes", "question_type": task} for j in range(2 if task == "plotQA" else 1)]
        dump(f"{root}/json/{name}.json", items)


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


# ----------------------------------------------------------------------------- MMVU


def mmvu(root, where="validation.json"):
    url = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/"
    write_video(f"{root}/videos/Chemistry/0.mp4", n=8)
    write_video(f"{root}/videos/Art/0.mp4", n=8)
    choices = {"A": "10.0", "B": "5.0", "C": "12.0", "D": "15.0", "E": "20.0"}
    items = [
        {"id": "validation_0", "video": url + "videos/Art/0.mp4", "question_type": "open-ended",
         "metadata": {"subject": "Art"}, "question": "Which technique?", "choices": dict.fromkeys("ABCDE", ""),
         "answer": "Dolly Zoom"},
        {"id": "validation_1", "video": url + "videos/Chemistry/0.mp4", "question_type": "multiple-choice",
         "metadata": {"subject": "Chemistry"}, "question": "How many grams?", "choices": choices, "answer": "A"},
        {"id": "validation_2", "video": "videos/Art/0.mp4", "question_type": "multiple-choice",
         "metadata": {"subject": "Art"}, "question": "Which style?", "choices": choices, "answer": "E"},
        {"id": "validation_3", "video": url + "videos/Art/9.mp4", "question_type": "multiple-choice",
         "metadata": {"subject": "Art"}, "question": "Which era?", "choices": choices, "answer": "C"},
    ]
    dump(f"{root}/{where}", items)


def test_mmvu_end_to_end(ckpt, tmp_path, capsys):
    root = str(tmp_path / "MMVU")
    mmvu(root)
    samples = E.read_mmvu(root, "reason")
    assert [s.meta["line"] for s in samples] == ["validation_1", "validation_2", "validation_3"]  # multiple choice only
    assert samples[0].video == f"{root}/videos/Chemistry/0.mp4" and samples[1].video == f"{root}/videos/Art/0.mp4"
    assert [s.solution for s in samples] == ["A", "E", "C"] and samples[0].meta["subject"] == "Chemistry"
    preds = str(tmp_path / "mmvu.jsonl")
    code, out, err = run(["--ckpt", ckpt, "--bench", "mmvu", "--root", root, "--predictions", preds,
                          "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(preds)]
    assert len(rows) == 2 and {r["subject"] for r in rows} == {"Chemistry", "Art"}
    summary = json.load(open(tmp_path / "mmvu.summary.json"))
    assert summary["missing"] == 1 and summary["groups"]["Art"]["missing"] == 1
    assert summary["average"] == pytest.approx(sum(r["correct"] for r in rows) / 2)
    assert "Chemistry" in out and "Art/9.mp4" in err
    other = str(tmp_path / "MMVU-github")  # the GitHub repository keeps the file in data/
    mmvu(other, "data/validation.json")
    assert len(E.read_mmvu(other, "option")) == 3
