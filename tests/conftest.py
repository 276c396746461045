"""Shared by the tests: tiny models of model.py's named sizes, a tiny checkpoint with its tokenizer, and
miniature copies of the four benchmarks' published layouts, with synthetic videos (frame i of every video is
flat gray 20*i, so a sampled frame tells its index). Fixtures are found by pytest; helpers are imported
(`from conftest import ...`). Nothing is downloaded."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data as D
import eval as E
import model as M
import sample
import weights


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over ~5 s (compiles, several runs, processes); "
                                       "`-m \"not slow\"` skips them for a fast loop")


def tiny_model(seed=0, size="test", **parts):
    """A model of the named size (model.CONFIGS; parts as in model.config), its decoder weights 20x the
    0.02 init so that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = M.TinyLLaVA(M.config(size, **parts)).eval()
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.mul_(20 if p.ndim == 2 else 1)
    return model


def tiny_prompt(model, seed=1):
    """bench.py's one prompt of its tiny shapes: ids (1, L) with the placeholder, and the video encoded."""
    ids, pixels = bench.inputs(model.config, bench.TINY, torch.device("cpu"), seed=seed)
    with torch.no_grad():
        return ids, model.encode_video(pixels)


@pytest.fixture
def one_thread():
    """Tiny models are thousands of tiny ops: on a busy 2-core machine, waking a second OpenMP thread
    for each costs more than the op (bench --tiny took 2 s on one thread, 38 s on two while another
    job ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- a checkpoint, videos, a scripted model

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
    cfg = M.config("test", text={"vocab_size": tok.vocab_size}, raw={"num_frames": 4})
    out = root / "model"
    weights.save_pretrained(M.TinyLLaVA(cfg), str(out))
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


# ----------------------------------------------------------------------------- the four benchmarks' layouts


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


def mlvu(root):
    """The 7 task files; videos under video/<k>_<task>/ for the first four, video/<task>/ for the others."""
    for k, name in enumerate(E.MLVU_TASKS):
        task = name.split("_", 1)[1]
        write_video(f"{root}/video/{name if k < 4 else task}/{task}.mp4", n=6)
        items = [{"video": f"{task}.mp4", "duration": 10, "question": f"{task} {j}", "candidates": ["yes", "no"],
                  "answer": "yes", "question_type": task} for j in range(2 if task == "plotQA" else 1)]
        dump(f"{root}/json/{name}.json", items)


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
