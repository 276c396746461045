"""Ask a TinyLLaVA-Video model about a video, or score it on a multiple-choice set.

    python sample.py --ckpt DIR --video clip.mp4 --question "What is the man doing?" --options "sit down" "run"
    python sample.py --ckpt DIR --eval test.jsonl                 # accuracy, predictions.jsonl, resumable
    python sample.py --ckpt DIR --bench mvbench --root MVBench    # or videomme, mlvu, mmvu: the paper's table

Two prompt modes, as the paper evaluates: "reason" asks for <think> and <answer> tags and reads the letter
inside <answer>; "option" asks for the letter directly. An answer with no readable letter counts as wrong,
and is counted separately (the original code guessed a random option instead).

The four benchmarks are read from their folders exactly as published (MVBench's 20 task files with start/end
bounds and frame folders, Video-MME's parquet, MLVU's 7 task files, MMVU's validation.json), turned into the
same multiple-choice samples as --eval, and averaged each its own way: MVBench over all items, MLVU over its
tasks, Video-MME per duration, MMVU over all items.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter

import cv2
import numpy as np
import torch
from tqdm import tqdm

import data as D
import grpo as G
import model as M


class UsageError(Exception):
    """Bad command-line input (a missing checkpoint, video or field): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- loading


def load(ckpt, device=None, dtype=None):
    """-> model (eval mode) and tokenizer from a checkpoint directory holding tokenizer.json."""
    if not os.path.isdir(ckpt) or not os.path.exists(os.path.join(ckpt, "config.json")):
        raise UsageError(f"checkpoint {ckpt}: not a directory with config.json")
    if not os.path.exists(os.path.join(ckpt, "tokenizer.json")):
        raise UsageError(f"checkpoint {ckpt}: no tokenizer.json beside the weights")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = M.TinyLLaVA.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    return model, D.Tokenizer(ckpt, model.config.text.vocab_size)


def checkpoint_id(ckpt):
    """What tells one checkpoint's weights from another's, cheaply: its path, and a hash of config.json and
    of each weights file's name, size and modification time (every save writes new files)."""
    h = hashlib.sha256(open(os.path.join(ckpt, "config.json"), "rb").read())
    for f in sorted(glob.glob(os.path.join(ckpt, "model*.safetensors"))):
        h.update(f"{os.path.basename(f)} {os.stat(f).st_size} {os.stat(f).st_mtime_ns}".encode())
    return f"{os.path.abspath(ckpt)} {h.hexdigest()[:16]}"


def default_frames(model):
    """Frames per video: what the checkpoint was trained with when its config says, else the paper's 16."""
    return int(model.config.raw.get("num_frames", 16))


# ----------------------------------------------------------------------------- answers


def parse_answer(text, num_options=26, mode="reason"):
    """The option letter a completion chose, or None. reason: the first standalone capital letter inside
    the first <answer>...</answer>; option: the first standalone capital letter of the whole text."""
    if mode == "reason":
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        if not m:
            return None
        text = m.group(1)
    letters = "".join(chr(ord("A") + i) for i in range(num_options))
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return m.group(1) if m else None


@torch.no_grad()
def generate(model, tok, questions, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0, generator=None):
    """One answer per question: questions (B strings), pixels (B, T, 3, S, S) -> B strings.
    The prompts are left-padded and decoded together with the KV cache."""
    device = next(model.parameters()).device
    ids, mask = D.collate_prompts([tok.prompt_ids(q) for q in questions], tok.pad_id)
    embeds = model.encode_video(pixels.to(device, next(model.vision_tower.parameters()).dtype))
    ro = G.rollout(model, ids.to(device), embeds, tok.eos_id, tok.pad_id, mask.to(device), group_size=1,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return [tok.decode(r[m > 0]) for r, m in zip(ro.completion_ids.cpu(), ro.mask.cpu())]


@torch.no_grad()
def stream(model, tok, question, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0):
    """Yield the answer to one question piece by piece as it is generated (pixels (T, 3, S, S))."""
    device = next(model.parameters()).device
    ids = torch.tensor([tok.prompt_ids(question)], device=device)
    embeds, mask = model.embed(ids, model.encode_video(pixels[None].to(device, next(model.vision_tower.parameters()).dtype)))
    lm = model.language_model
    cache = model.new_cache(1, embeds.shape[1] + max_new_tokens)
    logits = lm.logits(lm.model(embeds, mask, cache)[:, -1])
    out, shown = [], ""
    for _ in range(max_new_tokens):
        token, _ = G.sample_token(logits, temperature, top_k, top_p)
        if token.item() == tok.eos_id:
            break
        out.append(token.item())
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(shown):]
            shown = text
        logits = lm.decode_step(token, cache)


# ----------------------------------------------------------------------------- clips: start/end bounds and frame folders
# A whole video file goes through data.load_video, exactly as in training. Some benchmark items ask about a
# part of a video (MVBench's start/end seconds) or come as a folder of frame images (MVBench's Episodic
# Reasoning): the same uniform sampling, np.linspace over the decoded frames, restricted to the bound.

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def clip_indices(n, num_frames, bound=None, fps=None):
    """Frame indices into n decoded frames: uniform over all of them, or over the frames inside
    bound = (start, end) seconds at `fps` frames per second (clamped to the video, never empty)."""
    lo, hi = 0, n - 1
    if bound is not None:
        lo = min(max(0, round(bound[0] * fps)), n - 1)
        hi = max(min(round(bound[1] * fps), n - 1), lo)
    return np.linspace(lo, hi, num_frames).astype(int)


def read_clip(path, num_frames, bound=None, fps=None):
    """-> (num_frames, H, W, 3) uint8 RGB from a video file (its own frame rate) or from a folder of frame
    images taken in name order (`fps` frames per second), optionally within bound = (start, end) seconds."""
    if os.path.isdir(path):
        if bound is not None and not fps:
            raise D.DataError(f"{path}: a folder of frames with start/end seconds but no frame rate")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
        if not names:
            raise D.VideoError(f"{path}: a folder with no frame images ({', '.join(IMAGE_EXTS)})")
        frames = []
        for i in clip_indices(len(names), num_frames, bound, fps):
            img = cv2.imread(os.path.join(path, names[i]), cv2.IMREAD_COLOR)
            if img is None:
                raise D.VideoError(f"{os.path.join(path, names[i])}: OpenCV cannot read this image")
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        return np.stack(frames)
    if not os.path.exists(path):
        raise D.VideoError(f"{path}: no such file")
    # Two passes: count the frames by decoding them (container counts can be wrong), then keep the chosen ones.
    cap = cv2.VideoCapture(path)
    rate = cap.get(cv2.CAP_PROP_FPS)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    if n == 0:
        raise D.VideoError(f"{path}: OpenCV decodes no frames from it")
    if bound is not None and not rate > 0:
        raise D.VideoError(f"{path}: no frame rate in the file, so its start/end seconds cannot be found")
    wanted = Counter(clip_indices(n, num_frames, bound, rate).tolist())
    cap, frames = cv2.VideoCapture(path), []
    for i in range(max(wanted) + 1):
        if not cap.grab():
            raise D.VideoError(f"{path}: decoding stopped at frame {i} of {n}")
        if i in wanted:
            img = cv2.cvtColor(cap.retrieve()[1], cv2.COLOR_BGR2RGB)
            frames += [img] * wanted[i]
    cap.release()
    return np.stack(frames)


def load_clip(sample, num_frames, size):
    """The (T, 3, size, size) model input for one sample; meta "bound" ([start, end] seconds) and "fps"
    (of a frame folder) come from the benchmark readers below."""
    bound = sample.meta.get("bound")
    if bound is None and not os.path.isdir(sample.video):
        return D.load_video(sample.video, num_frames=num_frames, size=size)
    return D.preprocess_frames(read_clip(sample.video, num_frames, bound, sample.meta.get("fps")), size)


# ----------------------------------------------------------------------------- scoring a multiple-choice set


def read_predictions(path, run=None):
    """Predictions already written by an interrupted run: {item key: record}. With `run` (the checkpoint
    and settings each record carries), a file holding any other run's answers is moved aside to
    PATH.stale and nothing is resumed: answers are only ever reused for the model and settings that made them."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[r["key"]] = r
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by the interruption: that item is redone
        if run is not None and any(r.get("run") != run for r in done.values()):
            os.replace(path, path + ".stale")
            print(f"sample.py: {path} holds answers of another checkpoint or other settings: moved to "
                  f"{path}.stale, starting afresh", file=sys.stderr)
            return {}
    return done


def evaluate(model, tok, samples, mode="reason", predictions=None, batch_size=8, frames=None, max_new_tokens=512,
             progress=True, desc="eval", run=None):
    """Answer every sample greedily and compare the letter with `sample.solution`.

    samples: data.Sample with `question` already holding the options and the mode's suffix. With a
    `predictions` path, each answer is appended as a JSON line as soon as it exists, and the items found
    there are not asked again if they carry the same `run` (see read_predictions). A video that cannot be read is reported, skipped and counted (it is asked
    again on the next run). -> {"accuracy", "correct", "total", "unparsed", "missing_videos"} plus the
    records (one per answer, with the sample's meta but its options) and the skipped samples ("missing")."""
    frames = frames or default_frames(model)
    size = model.config.vision.image_size
    done = read_predictions(predictions, run) if predictions else {}
    records = [done[k] for k in (sample_key(s) for s in samples) if k in done]
    todo = [s for s in samples if sample_key(s) not in done]
    missing = []
    out = open(predictions, "a") if predictions else None
    if out and out.tell() > 0:
        with open(predictions, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write("\n")  # end a line an interruption cut short, so the next answer starts its own
    try:
        bar = tqdm(total=len(samples), initial=len(records), desc=desc, disable=not progress, dynamic_ncols=True)
        for i in range(0, len(todo), batch_size):
            batch, pixels = [], []
            for s in todo[i:i + batch_size]:
                try:
                    pixels.append(load_clip(s, frames, size))
                    batch.append(s)
                except D.VideoError as e:
                    missing.append(s)
                    tqdm.write(f"missing video, counted as skipped: {e}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            texts = generate(model, tok, [s.question for s in batch], torch.stack(pixels), max_new_tokens)
            for s, text in zip(batch, texts):
                num_options = len(s.meta.get("options") or []) or 26
                pred = parse_answer(text, num_options, mode)
                # GRPO rows give the solution as "<answer>B</answer>", multiple-choice rows as "B"
                answer = parse_answer(s.solution, 26, "reason" if "<answer>" in s.solution else "option")
                r = {"key": sample_key(s), "video": s.video, "answer": answer, "pred": pred,
                     "correct": pred is not None and pred == answer, "output": text, "num_options": num_options,
                     **{k: v for k, v in s.meta.items() if k != "options"}, "run": run}
                records.append(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()
            bar.update(len(batch))
            correct = sum(r["correct"] for r in records)
            bar.set_postfix(acc=f"{correct / len(records):.3f}", missing=len(missing))
        bar.close()
    finally:
        if out:
            out.close()
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(len(records), 1), "correct": correct, "total": len(records),
            "unparsed": sum(r["pred"] is None for r in records), "missing_videos": len(missing), "records": records,
            "missing": missing}


def sample_key(s):
    return f"{s.meta.get('line', '')}:{s.video}:{s.question}"


# ----------------------------------------------------------------------------- the paper's four benchmarks
# Each reader takes a benchmark's folder as published and returns data.Samples: the question with its options
# rendered "A. text", one per line, and the mode's suffix (data.mc_question, as in training); the answer's
# letter as solution; meta with "line" (the item's name, for resuming), "options" and the field the
# benchmark is averaged by. Layout errors name the file and item; a missing video is only counted later.

def need(item, key, where):
    if not isinstance(item, dict) or key not in item:
        raise D.DataError(f"{where}: no field {key!r}")
    return item[key]


def read_json(path, what):
    if not os.path.exists(path):
        raise UsageError(f"{what}: {path} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise D.DataError(f"{path}: not valid JSON ({e})") from None


def letter_of(answer, options, where):
    """The letter of `answer`, an option's text, among `options`."""
    if answer not in options:
        raise D.DataError(f"{where}: answer {answer!r} is not one of the options {options}")
    return chr(ord("A") + options.index(answer))


def mc_sample(video, question, options, letter, mode, **meta):
    return D.Sample(video, D.mc_question(question, options, mode), letter, {"options": options, **meta})


# MVBench (OpenGVLab/MVBench): json/<task>.json, each a list of {"video", "question", "candidates", "answer"
# (the text of one candidate)}, plus "start"/"end" seconds for the bounded tasks; videos under video/<folder>/.
# Task -> (json file, video folder, bounded), as in the evaluation code published with the benchmark.
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", False),
    "Action Count": ("action_count.json", "perception/videos", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", False),
    "State Change": ("state_change.json", "perception/videos", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", False),
    "Character Order": ("character_order.json", "perception/videos", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", False),
}
# Episodic Reasoning's "videos" are folders of JPEG frames taken 3 times a second (folder -> frame rate).
# Other videos are files of any kind OpenCV decodes (mp4, webm, avi, gif). The bounds are applied to every
# bounded task; the paper's own script applied them to the frame folders only and sampled the whole file for
# the four others.
MVBENCH_FRAME_FOLDERS = {"tvqa/frames_fps3_hq": 3}


def read_mvbench(root, mode):
    samples = []
    for task, (file, folder, bounded) in MVBENCH_TASKS.items():
        path = os.path.join(root, "json", file)
        for i, item in enumerate(read_json(path, f"MVBench task {task!r} (expected the 20 task files in json/)")):
            where = f"{path} item {i}"
            options = [str(c) for c in need(item, "candidates", where)]
            meta = {"line": f"{file}:{i}", "task": task}
            if bounded:
                meta["bound"] = [float(need(item, "start", where)), float(need(item, "end", where))]
            if folder in MVBENCH_FRAME_FOLDERS:
                meta["fps"] = MVBENCH_FRAME_FOLDERS[folder]
            video = os.path.join(root, "video", folder, need(item, "video", where))
            samples.append(mc_sample(video, need(item, "question", where), options,
                                     letter_of(str(need(item, "answer", where)), options, where), mode, **meta))
    return samples


# Video-MME (lmms-lab/Video-MME): videomme/test-*.parquet with rows {"videoID", "duration" (short, medium,
# long), "question", "options" (already lettered, "A. ..."), "answer" (a letter), "task_type", ...}; videos
# data/<videoID>.mp4 once the zips are extracted. A JSON export of the same rows (videomme/*.json, a list, or
# *.jsonl) is read too, and needs no parquet reader.
VIDEOMME_DURATIONS = ("short", "medium", "long")


def read_videomme_rows(folder):
    parquets = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if parquets:
        try:
            import pyarrow.parquet as pq  # not a run-time dependency: only Video-MME needs it
        except ImportError:
            raise UsageError("Video-MME ships parquet: pip install pyarrow") from None
        return [row for p in parquets for row in pq.read_table(p).to_pylist()]
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*.jsonl"))):
        if path.endswith(".jsonl"):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        else:
            rows += read_json(path, "Video-MME")
    if not rows:
        raise UsageError(f"Video-MME: no {folder}/test-*.parquet (nor a .json/.jsonl export of its rows)")
    return rows


def read_videomme(root, mode):
    samples = []
    for i, row in enumerate(read_videomme_rows(os.path.join(root, "videomme"))):
        where = f"Video-MME row {i}"
        video_id = row.get("videoID") or need(row, "video_id", where)
        letters, options = [], []
        for o in need(row, "options", where):
            m = re.match(r"\s*([A-Z])[.)]\s*(.*)", str(o), re.DOTALL)  # "A. text" -> "A", "text"
            letters.append(m.group(1) if m else chr(ord("A") + len(letters)))
            options.append(m.group(2) if m else str(o))
        answer = str(need(row, "answer", where)).strip()
        if answer not in letters:
            raise D.DataError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
        samples.append(mc_sample(os.path.join(root, "data", f"{video_id}.mp4"), need(row, "question", where), options,
                                 chr(ord("A") + letters.index(answer)), mode, line=str(row.get("question_id", i)),
                                 duration=need(row, "duration", where), task_type=row.get("task_type")))
    return samples


# MLVU dev set (MLVU/MVLU): json/<k>_<task>.json for the 7 multiple-choice tasks (8_sub_scene and 9_summary
# are open generation, not scored here), each a list of {"video", "question", "candidates", "answer" (text)}.
# Videos under video/<k>_<task>/ as published (and as the paper's script reads them), or video/<task>/ as
# MLVU's own evaluation code names the folders: whichever exists.
MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")


def read_mlvu(root, mode):
    samples = []
    for name in MLVU_TASKS:
        task = name.split("_", 1)[1]
        path = os.path.join(root, "json", name + ".json")
        folders = [os.path.join(root, "video", name), os.path.join(root, "video", task)]
        folder = next((f for f in folders if os.path.isdir(f)), folders[0])
        for i, item in enumerate(read_json(path, f"MLVU task {task!r} (expected the 7 task files in json/)")):
            where = f"{path} item {i}"
            options = [str(c) for c in need(item, "candidates", where)]
            samples.append(mc_sample(os.path.join(folder, need(item, "video", where)), need(item, "question", where),
                                     options, letter_of(str(need(item, "answer", where)), options, where), mode,
                                     line=f"{name}:{i}", task=task))
    return samples


# MMVU (yale-nlp/MMVU): validation.json (at the root as on Hugging Face, or data/validation.json as in the
# GitHub repository), a list of {"id", "video" (a URL into the dataset repo, or a relative path),
# "question_type", "question", "choices" {letter: text}, "answer" (a letter), "metadata": {"subject"}}.
# Only the multiple-choice items are scored, as in the paper; open-ended ones are left out.
MMVU_URL = "/resolve/main/"  # https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4


def read_mmvu(root, mode):
    path = os.path.join(root, "validation.json")
    if not os.path.exists(path) and os.path.exists(os.path.join(root, "data", "validation.json")):
        path = os.path.join(root, "data", "validation.json")
    samples = []
    for i, item in enumerate(read_json(path, "MMVU")):
        where = f"{path} item {i}"
        if need(item, "question_type", where) != "multiple-choice":
            continue
        choices = {k: v for k, v in need(item, "choices", where).items() if str(v).strip()}
        answer = str(need(item, "answer", where)).strip()
        if answer not in choices:
            raise D.DataError(f"{where}: answer {answer!r} is not one of the choices {list(choices)}")
        video = need(item, "video", where)
        video = video.split(MMVU_URL, 1)[1] if MMVU_URL in video else video
        samples.append(mc_sample(os.path.join(root, video), need(item, "question", where),
                                 [str(v) for v in choices.values()], chr(ord("A") + list(choices).index(answer)),
                                 mode, line=str(item.get("id", i)),
                                 subject=(item.get("metadata") or {}).get("subject", "all")))
    return samples


# name: (reader, the meta field each table row groups by, how the benchmark's own average is taken)
BENCHMARKS = {
    "mvbench": (read_mvbench, "task", "micro"),
    "videomme": (read_videomme, "duration", "micro"),
    "mlvu": (read_mlvu, "task", "macro"),
    "mmvu": (read_mmvu, "subject", "micro"),
}


# ----------------------------------------------------------------------------- averages and the table


def summarize(records, group, average, order=(), missing=()):
    """Accuracy per group (task, duration or subject) and the benchmark's average: "micro" over all answered
    items, or "macro", the mean of the groups' accuracies. records: evaluate's (each has "correct", "pred",
    "num_options" and the group field); missing: metas of items whose video could not be read, counted
    apart and left out of the accuracies. An unparsed answer counts as wrong; "guessed" is the accuracy
    expected had each been a uniform random guess, as the original code did."""
    groups = {name: dict(correct=0, total=0, unparsed=0, missing=0, guess=0.0) for name in order}
    for r in records:
        g = groups.setdefault(r[group], dict(correct=0, total=0, unparsed=0, missing=0, guess=0.0))
        g["total"] += 1
        g["correct"] += bool(r["correct"])
        if r["pred"] is None:
            g["unparsed"] += 1
            g["guess"] += 1 / r["num_options"]
    for m in missing:
        groups.setdefault(m[group], dict(correct=0, total=0, unparsed=0, missing=0, guess=0.0))["missing"] += 1
    for g in groups.values():
        guess = g.pop("guess")
        g["accuracy"] = g["correct"] / g["total"] if g["total"] else None
        g["guessed"] = (g["correct"] + guess) / g["total"] if g["total"] else None
    answered = [g for g in groups.values() if g["total"]]
    out = {"average_kind": average, "groups": groups}
    for key in ("correct", "total", "unparsed", "missing"):
        out[key] = sum(g[key] for g in groups.values())
    for key, field in (("average", "accuracy"), ("average_guessed", "guessed")):
        if not answered:
            out[key] = None
        elif average == "macro":
            out[key] = sum(g[field] for g in answered) / len(answered)
        else:
            out[key] = sum(g[field] * g["total"] for g in answered) / out["total"]
    return out


def format_table(title, summary, group):
    """The summary as text: one row per group, then the average, accuracies in percent."""
    def pct(x):
        return f"{'-':>5}" if x is None else f"{100 * x:5.1f}"

    width = max([len(str(n)) for n in summary["groups"]] + [28])
    head = f"{group:<{width}}  {'acc %':>5}  {'correct/total':>13}  {'unparsed':>8}  {'missing':>7}  {'guessed %':>9}"
    lines = [title, head, "-" * len(head)]
    rows = list(summary["groups"].items())
    rows.append((f"average ({summary['average_kind']})", {**summary, "accuracy": summary["average"],
                                                          "guessed": summary["average_guessed"]}))
    for i, (name, g) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(head))
        lines.append(f"{str(name):<{width}}  {pct(g['accuracy'])}  {g['correct']:>6}/{g['total']:<6}  "
                     f"{g['unparsed']:>8}  {g['missing']:>7}  {pct(g['guessed']):>9}")
    return "\n".join(lines)


def run_benchmark(model, tok, samples, bench, mode, predictions, batch_size, frames, max_new_tokens, run=None):
    """Answer (or resume) every item, print the table, write the summary beside the predictions."""
    _, group, average = BENCHMARKS[bench]
    res = evaluate(model, tok, samples, mode, predictions, batch_size, frames, max_new_tokens, desc=bench, run=run)
    order = list(dict.fromkeys(s.meta[group] for s in samples))
    if bench == "videomme":
        order = sorted(order, key=lambda d: VIDEOMME_DURATIONS.index(d) if d in VIDEOMME_DURATIONS else len(order))
    summary = summarize(res["records"], group, average, order, [s.meta for s in res["missing"]])
    print(format_table(f"{bench}, {mode} mode, {frames} frames. An unparsed answer counts as wrong (guessed %: as "
                       f"if it were a random guess, the original code's rule); a missing video is left out.",
                       summary, group))
    if summary["missing"]:
        print(f"warning: {summary['missing']} of {len(samples)} items have no readable video: this is not the "
              f"benchmark's full score")
    path = os.path.splitext(predictions)[0] + ".summary.json"
    with open(path, "w") as f:
        json.dump({"benchmark": bench, "mode": mode, "run": run, **summary}, f, indent=1)
    print(f"predictions in {predictions}, summary in {path}")
    return summary


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer a question about a video, or score a multiple-choice set or "
                                            "one of the paper's benchmarks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: (print(f"sample.py: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--video", help="video file to ask about")
    p.add_argument("--question", help="the question")
    p.add_argument("--options", nargs="+", help="answer options, lettered A, B, C... in this order")
    p.add_argument("--mode", choices=["reason", "option"], default="reason",
                   help="reason: think in <think> tags, answer in <answer> tags; option: answer with the letter")
    p.add_argument("--eval", metavar="FILE.jsonl", help="score a multiple-choice file (video, question, options, answer)")
    p.add_argument("--bench", choices=sorted(BENCHMARKS), help="score one of the paper's benchmarks, read from --root")
    p.add_argument("--root", help="--bench: the benchmark's folder as downloaded; --eval: the directory its videos "
                                  "are relative to (default: the file's)")
    p.add_argument("--predictions", help="per-item predictions (JSONL), resumed if present (default: beside --eval; "
                                         "CKPT/eval/BENCH.MODE.jsonl for --bench)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together in --eval and --bench")
    p.add_argument("--frames", type=int, default=0, help="frames per video (0: the checkpoint's, else 16)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.bench and not args.eval and not (args.video and args.question):
            raise UsageError("give --video and --question, --eval FILE.jsonl, or --bench NAME --root DIR")
        if args.bench and args.eval:
            raise UsageError("give --bench or --eval, not both")
        for ok, msg in [(args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"), (args.frames >= 0, "--frames must be >= 0"),
                        (args.batch_size >= 1, "--batch-size must be >= 1"), (args.temperature >= 0, "--temperature must be >= 0"),
                        (args.top_k >= 0, "--top-k must be >= 0"), (0 < args.top_p <= 1, "--top-p must be in (0, 1]")]:
            if not ok:
                raise UsageError(msg)
        if args.bench:  # read the benchmark first: a layout error should not wait for the model to load
            if not args.root or not os.path.isdir(args.root):
                raise UsageError(f"--bench {args.bench} needs --root DIR, the benchmark's folder (got {args.root})")
            samples = BENCHMARKS[args.bench][0](args.root, args.mode)
        model, tok = load(args.ckpt, args.device)
        frames = args.frames or default_frames(model)
        run = {"checkpoint": checkpoint_id(args.ckpt), "mode": args.mode, "frames": frames,
               "max_new_tokens": args.max_new_tokens, "dtype": str(next(model.parameters()).dtype)}
        if args.bench:
            preds = args.predictions or os.path.join(args.ckpt, "eval", f"{args.bench}.{args.mode}.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(preds)), exist_ok=True)
            run_benchmark(model, tok, samples, args.bench, args.mode, preds, args.batch_size, frames,
                          args.max_new_tokens, run)
            return 0
        if args.eval:
            if not os.path.exists(args.eval):
                raise UsageError(f"--eval {args.eval}: no such file")
            samples = D.read_mc_jsonl(args.eval, args.root, mode=args.mode)
            preds = args.predictions or os.path.splitext(args.eval)[0] + f".{args.mode}.predictions.jsonl"
            res = evaluate(model, tok, samples, args.mode, preds, args.batch_size, frames, args.max_new_tokens, run=run)
            print(f"accuracy {res['accuracy']:.4f} ({res['correct']}/{res['total']}), unparsed {res['unparsed']}, "
                  f"missing videos {res['missing_videos']}; predictions in {preds}")
            return 0
        if not os.path.exists(args.video):
            raise UsageError(f"--video {args.video}: no such file")
        pixels = D.load_video(args.video, num_frames=frames, size=model.config.vision.image_size)
        question = D.mc_question(args.question, args.options, args.mode) if args.options else args.question
        for piece in stream(model, tok, question, pixels, args.max_new_tokens, args.temperature, args.top_k, args.top_p):
            print(piece, end="", flush=True)
        print()
        return 0
    except (UsageError, D.VideoError, D.DataError, M.CheckpointError, FloatingPointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
