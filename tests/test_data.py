"""data.py: frames by content, Pillow parity, prompt and labels, datasets, the synthetic task."""

import json
import os
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import data as D
from model import IMAGE_TOKEN_INDEX


def write_video(path, frames, fps=4, color=True):
    h, w = frames[0].shape[:2]
    codec = "MJPG" if str(path).endswith(".avi") else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h), isColor=color)
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return str(path)


def indexed_video(path, n, size=(48, 32), fps=4):
    """Frame i is a flat grey of level 10 * i: its index can be read back from its mean."""
    return write_video(path, [np.full((size[1], size[0], 3), 10 * i, np.uint8) for i in range(n)], fps)


def read_indices(frames):
    return [int(round(f.mean() / 10)) for f in frames]


# ----------------------------------------------------------------------------- frames


@pytest.mark.parametrize("n,t", [(20, 16), (16, 16), (23, 7), (5, 16), (1, 4)])
def test_frame_indices_by_content(tmp_path, n, t):
    path = indexed_video(tmp_path / "v.mp4", n)
    frames = D.sample_frames(path, num_frames=t)
    assert frames.shape == (t, 32, 48, 3) and frames.dtype == np.uint8
    assert read_indices(frames) == np.linspace(0, n - 1, t).astype(int).tolist()


def test_fps_mode(tmp_path):
    path = indexed_video(tmp_path / "v.mp4", 20, fps=4)  # 5 seconds
    assert read_indices(D.sample_frames(path, num_frames=None, max_frames=3)) == [0, 9, 19]
    assert len(D.sample_frames(path, num_frames=None, max_frames=16)) == 5


def test_wrong_container_count_falls_back_to_decoding(tmp_path, monkeypatch):
    path = indexed_video(tmp_path / "v.mp4", 12)
    real = cv2.VideoCapture

    class Lying:  # reports 40 frames for a 12-frame file
        def __init__(self, p):
            self.cap = real(p)

        def get(self, prop):
            return 40 if prop == cv2.CAP_PROP_FRAME_COUNT else self.cap.get(prop)

        def __getattr__(self, name):
            return getattr(self.cap, name)

    monkeypatch.setattr(D.cv2, "VideoCapture", Lying)
    assert read_indices(D.sample_frames(path, num_frames=4)) == [0, 3, 7, 11]


def test_grayscale_and_odd_sizes(tmp_path):
    gray = write_video(tmp_path / "g.avi", [np.full((33, 47), 100, np.uint8)] * 3, color=False)  # mp4v rounds sizes to even
    frames = D.sample_frames(gray, num_frames=2)
    ok, first = cv2.VideoCapture(gray).read()  # the writer may round odd sizes: compare with what decodes
    assert frames.shape == (2, *first.shape[:2], 3) and abs(int(frames.mean()) - 100) <= 2
    pixels = D.preprocess_frames(frames, size=20)
    assert pixels.shape == (2, 3, 20, 20)


def test_video_errors_name_the_path(tmp_path):
    with pytest.raises(D.VideoError, match="missing.mp4: no such file"):
        D.sample_frames(str(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(D.VideoError, match="notes.mp4"):
        D.sample_frames(str(text))
    empty = tmp_path / "empty.mp4"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 4, (16, 16)).release()
    with pytest.raises(D.VideoError, match="empty.mp4"):
        D.sample_frames(str(empty))


# ----------------------------------------------------------------------------- preprocessing


def pillow(frames, size):
    """Pillow's bicubic, one axis at a time, horizontal first: what every Pillow version computes for
    these two calls (a single resize() call in Pillow 13 may run the vertical pass first on tall images)."""
    out = [np.asarray(Image.fromarray(f).resize((size, f.shape[0]), Image.BICUBIC).resize((size, size), Image.BICUBIC), np.float32)
           for f in frames]
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255 - 0.5) / 0.5


@pytest.mark.parametrize("h,w,size", [(720, 1280, 384), (60, 100, 384), (200, 500, 384), (384, 384, 384), (45, 30, 16), (1000, 90, 384)])
def test_preprocessing_matches_pillow(h, w, size):
    rng = np.random.RandomState(h + w)
    smooth = cv2.resize(rng.randint(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8), (w, h))
    frames = np.stack([smooth, rng.randint(0, 256, (h, w, 3)).astype(np.uint8)])  # smooth and pure noise
    ours, ref = D.preprocess_frames(frames, size), pillow(frames, size)
    diff = (ours - ref).abs()
    assert ours.shape == (2, 3, size, size)
    assert diff.mean() <= 1e-3 and diff.max() <= 0.02, (diff.mean().item(), diff.max().item())
    assert (diff > 0).float().mean() < 1e-3  # all but a rare pixel exactly Pillow's
    if w >= h:  # landscape video frames: a single resize() call agrees on every Pillow version
        single = torch.from_numpy(np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC), np.float32)
                                            for f in frames])).permute(0, 3, 1, 2).div(255).sub(0.5).div(0.5)
        assert (ours - single).abs().max() <= 0.0079


def test_preprocessing_is_fast():
    frames = np.random.RandomState(0).randint(0, 256, (16, 720, 1280, 3)).astype(np.uint8)
    D.preprocess_frames(frames[:1])
    t = time.perf_counter()
    D.preprocess_frames(frames)
    assert time.perf_counter() - t < 5.0  # about 0.5 s on 2 idle cores; generous for a loaded CI machine


# ----------------------------------------------------------------------------- prompt and tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [D.build_prompt("What is the man doing?\nA. sit down\nB. run") + " <think>he sits</think> <answer>A</answer>"] * 5
    return D.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"), vocab_size=300)


def test_prompt_is_exact():
    assert D.build_prompt("Q?") == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                                    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:")
    assert D.mc_question("Q?", ["sit", "run"], "option") == "Q?\nA. sit\nB. run\nAnswer with the option's letter from the given choices directly."
    assert D.mc_question("Q?", ["A. sit", "B. run"]).startswith("Q?\nA. sit\nB. run\nOutput the thinking process in <think>")
    with pytest.raises(ValueError):
        D.build_prompt("<image> twice")


def test_prompt_ids_around_the_placeholder(tok):
    ids = tok.prompt_ids("Why?")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    p = ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(ids[:p]) == D.SYSTEM + " USER: "
    assert tok.decode(ids[p + 1:]) == "\nWhy? ASSISTANT:"
    assert tok.decode(tok.encode("hello") + [tok.eos_id]) == "hello"
    assert tok.eos_id == tok.pad_id == tok.tok.token_to_id("<|endoftext|>")


def test_slow_tokenizer_files_load_with_tokenizers_alone(tmp_path):
    """A checkpoint as the original code saves it: vocab.json, merges.txt, added_tokens.json,
    tokenizer_config.json, special_tokens_map.json, no tokenizer.json. A small byte-level BPE vocabulary is
    trained here with Qwen2's pre-tokenizer; transformers' Qwen2Tokenizer on the same files is the reference."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    import transformers  # the reference: missing, the test fails rather than skips
    texts = [D.build_prompt(D.mc_question("What does the café owner do (at 12:45)?", ["sit down", "run"])),
             "<think>I'll count: 1, 22, 333 ... it's 3!</think>\n\n<answer>B</answer>", "naïve  \t tabs\r\nend"] * 4
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(D.QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=350, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(tmp_path))  # vocab.json, merges.txt
    n = bpe.get_vocab_size()
    specials = {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}
    (tmp_path / "added_tokens.json").write_text(json.dumps(specials))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 3072, "added_tokens_decoder": {str(i): {
            "content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
            for t, i in specials.items()}}))
    ours = D.Tokenizer(str(tmp_path))
    ref = transformers.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    assert ours.eos_id == ours.pad_id == ref.eos_token_id == n and ours.vocab_size == n + 3
    for text in texts + ["<|im_start|>user\nhi<|im_end|>x<|endoftext|>", "cafe\u0301 it'S (C) \u2603 \u65e5\u672c  "]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    question = D.mc_question("Which (A) way?", ["left", "right"])
    before, after = D.build_prompt(question).split("<image>")
    assert ours.prompt_ids(question) == ref.encode(before) + [IMAGE_TOKEN_INDEX] + ref.encode(after)
    assert ours.sft_ids(question, "<answer>A</answer>")[0][-1] == n


def test_sft_labels_mask_the_prompt(tok):
    ids, labels = tok.sft_ids("Why?", "<answer>A</answer>")
    n = len(tok.prompt_ids("Why?"))
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and ids[-1] == tok.eos_id
    assert tok.decode(ids[n:]) == " <answer>A</answer>"
    short_ids, short_labels = tok.sft_ids("Why?", "<answer>A</answer>", max_len=n + 2)
    assert len(short_ids) == len(short_labels) == n + 2


def test_collate(tok):
    a, b = [5, IMAGE_TOKEN_INDEX, 6], [7, IMAGE_TOKEN_INDEX]
    ids, mask = D.collate_prompts([a, b], tok.pad_id)
    assert ids.tolist() == [a, [tok.pad_id] + b] and mask.tolist() == [[True] * 3, [False, True, True]]
    ids, labels, mask = D.collate_sft([(a, [-100, -100, 6]), (b, [-100, -100])], tok.pad_id)
    assert ids.tolist() == [a, b + [tok.pad_id]] and labels.tolist() == [[-100, -100, 6], [-100, -100, -100]]
    assert mask.tolist() == [[True] * 3, [True, True, False]]


# ----------------------------------------------------------------------------- datasets


def test_three_formats(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"problem": "Q?\nA. x\nB. y", "solution": "<answer>B</answer>",
                                                  "video_filename": "./v/1.mp4", "extra": 3}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"video": "v/2.mp4", "conversations": [
        {"from": "human", "value": "<image>\nQ2?"}, {"from": "gpt", "value": "<think>t</think> <answer>A</answer>"}]}]))
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "3.mp4", "question": "Q3?", "options": ["x", "y"], "answer": "B"}) + "\n")
    g = D.read_samples(str(tmp_path / "g.jsonl"))[0][0]
    assert g.video == os.path.join(str(tmp_path), "./v/1.mp4") and g.question == "Q?\nA. x\nB. y" + D.GRPO_SUFFIX
    assert g.solution == "<answer>B</answer>" and g.meta == {"extra": 3, "line": 1}
    c = D.read_samples(str(tmp_path / "c.json"), root="/data")[0][0]
    assert c.video == "/data/v/2.mp4" and c.question == "Q2?" and c.solution.startswith("<think>")
    m = D.read_samples(str(tmp_path / "m.jsonl"), mode="option")[0][0]
    assert m.question == D.mc_question("Q3?", ["x", "y"], "option") and m.solution == "B"


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = json.dumps({"problem": "Q", "solution": "A", "video_filename": "a.mp4"})
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join([good, json.dumps({"problem": "Q", "solution": "A"}), "{oops", good,
                               json.dumps({"video": "a", "question": "q", "options": ["x"], "answer": "C"})]) + "\n")
    with pytest.raises(D.DataError, match=r"g.jsonl:2: missing field 'video_filename'"):
        D.read_samples(str(path))
    samples, skipped = D.read_samples(str(path), errors="skip")
    assert len(samples) == 2 and len(skipped) == 3
    assert "g.jsonl:3: not valid JSON" in skipped[1] and "g.jsonl:5: field 'answer'" in skipped[2]
    (tmp_path / "c.json").write_text(json.dumps([{"video": "v", "conversations": [{"from": "human"}]}]))
    with pytest.raises(D.DataError, match=r"c.json:1: field 'conversations'"):
        D.read_samples(str(tmp_path / "c.json"))
