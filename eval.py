"""The paper's four benchmarks: readers, the two evaluation protocols, the averages and the table.

MVBench, Video-MME, MLVU and MMVU are read from their folders as published, turned into data.Samples, and
averaged each its own way (MVBench over all items, MLVU over its tasks, Video-MME per duration, MMVU over all
items). `sample.py --bench` answers them under one of two protocols: clean (the default: options "A. text" as
in training, greedy, strict parsing, bounds applied) or original (what the paper's evaluation scripts did, to
reproduce its table: each benchmark's own prompt, sampled answers, their parser with its random guess, their
frames per benchmark and MVBench task).
"""

import glob
import json
import os
import re

import cv2
import numpy as np

import data


class UsageError(Exception):
    """Bad command-line input (a missing checkpoint, video or field): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- frames: both protocols
# Video files are decoded with data.read_frames, as in training. Some benchmark items ask about a part of a
# video (MVBench's start/end seconds) or come as a folder of frame images (MVBench's Episodic Reasoning).

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def pick_frames(rule, n, num_frames, bound=None, fps=None):
    """Indices (from 0) of the frames to use among n (decoded frames, or the images of a frame folder):
      "clean"     uniform over the frames inside bound = (start, end) seconds at `fps` (clamped to the
                  clip, never empty), or over the whole clip;
      "uniform"   the original plain-video pick: linspace(0, n-1).astype(int) over the whole clip;
      "unique"    the same without repeats (np.unique: fewer frames from a short clip), Video-MME and MLVU;
      "segments"  the original MVBench reader's: the middle of each of num_frames equal segments,
                  int(start + seg/2 + round(seg * i)), seg = (end - start) / num_frames, over the whole
                  clip (its .avi and .webm tasks), or with a bound over a frame folder's frames numbered
                  max(1, round(start*fps))..min(round(end*fps), n) from 1, as its files are (00001.jpg)."""
    if rule == "clean" and bound is not None:
        lo = min(max(0, round(bound[0] * fps)), n - 1)
        return np.linspace(lo, max(min(round(bound[1] * fps), n - 1), lo), num_frames).astype(int)
    if rule == "segments":
        start, end, first = (0, n - 1, 0) if bound is None else (
            max(1, round(bound[0] * fps)), min(round(bound[1] * fps), n), 1)
        seg = (end - start) / num_frames
        return np.array([int(start + seg / 2 + np.round(seg * i)) for i in range(num_frames)]) - first
    idx = data.frame_indices(n, num_frames)  # "clean" over the whole clip, "uniform" and "unique"
    return np.unique(idx) if rule == "unique" else idx


def read_clip(path, num_frames, bound=None, fps=None, rule="clean"):
    """-> ((T, H, W, 3) uint8 RGB, the T frame indices) from a video file (its own frame rate) or from a folder
    of frame images taken in name order (`fps` frames per second), as pick_frames chooses. A bound is used
    by the "clean" rule, and by "segments" on a frame folder."""
    if os.path.isdir(path):
        if bound is not None and not fps:
            raise data.DataError(f"{path}: a folder of frames with start/end seconds but no frame rate")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
        if not names:
            raise data.VideoError(f"{path}: a folder with no frame images ({', '.join(IMAGE_EXTS)})")
        idx = pick_frames(rule, len(names), num_frames, bound, fps)
        if idx.min() < 0 or idx.max() >= len(names):
            raise data.VideoError(f"{path}: frames {idx.tolist()} of {len(names)} (start/end outside the folder?)")
        frames = []
        for i in idx:
            img = cv2.imread(os.path.join(path, names[i]), cv2.IMREAD_COLOR)
            if img is None:
                raise data.VideoError(f"{os.path.join(path, names[i])}: OpenCV cannot read this image")
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        return np.stack(frames), idx

    def pick(n, rate):
        if bound is not None and rule == "clean" and not rate > 0:
            raise data.VideoError(f"{path}: no frame rate in the file, so its start/end seconds cannot be found")
        return pick_frames(rule, n, num_frames, bound if rule == "clean" else None, rate)
    return data.read_frames(path, pick)


def load_clip(sample, num_frames, size):
    """(the (T, 3, size, size) model input, its frame indices) for one sample; meta "bound" ([start, end]
    seconds), "fps" (of a frame folder) and "frames_rule" (default "clean") come from the readers below."""
    m = sample.meta
    frames, idx = read_clip(sample.video, num_frames, m.get("bound"), m.get("fps"), m.get("frames_rule", "clean"))
    return data.preprocess_frames(frames, size), idx


# ----------------------------------------------------------------------------- the original answer parser

def parse_original(text, choices, rng):
    """The original scripts' parser -> (letter or None, whether it was a random guess). Inside the first
    <answer>\\s*(.*?)\\s*</answer> (the dot does not match a newline): its first character if that is one of
    `choices` in either case, else the first choice X whose "(X)" or "(x)" it holds, else a random choice;
    an empty answer is no answer (wrong). No such tags: a random choice. rng: a random.Random."""
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", text)
    if m:
        answer = m.group(1).strip()
        if not answer:
            return None, False
        if answer[0] in choices or answer[0] in [c.lower() for c in choices]:
            return answer[0].upper(), False
        for c in choices:
            if f"({c})" in answer or f"({c.lower()})" in answer:
                return c, False
    return rng.choice(choices), True


# ----------------------------------------------------------------------------- the four readers
# Each reader takes a benchmark's folder as published and returns data.Samples: the question as the protocol
# asks it (see mc_sample); the answer's letter as solution; meta with "line" (the item's name, for resuming),
# "options", the field the benchmark is averaged by, and under the original protocol "choices" (the letters
# its parser picks among) and "frames_rule" (pick_frames). Layout errors name the file and item; a missing
# video is only counted later.

def need(item, key, where):
    if not isinstance(item, dict) or key not in item:
        raise data.DataError(f"{where}: no field {key!r}")
    return item[key]


def read_json(path, what):
    if not os.path.exists(path):
        raise UsageError(f"{what}: {path} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{path}: not valid JSON ({e})") from None


def letter_of(answer, among, where, what="options"):
    """The letter of `answer` by its place among the options (their texts, or the benchmark's own letters)."""
    if answer not in among:
        raise data.DataError(f"{where}: answer {answer!r} is not one of the {what} {among}")
    return chr(ord("A") + among.index(answer))


def mc_sample(video, question, options, letter, mode, body=None, choices=None, **meta):
    """clean (no body): the options rendered "A. text", one per line, and the mode's suffix (data.mc_question,
    as in training). original: the benchmark's own prompt body, then the reasoning suffix."""
    if body is None:
        return data.Sample(video, data.mc_question(question, options, mode), letter, {"options": options, **meta})
    choices = choices or [chr(ord("A") + i) for i in range(len(options))]
    return data.Sample(video, body + data.REASON_SUFFIX, letter, {"options": options, "choices": choices, **meta})


def lettered(options, form):
    """The original scripts' option lines: form "{L}. {c}" or "({L}) {c}", each line ending in a newline."""
    return "".join(form.format(L=chr(ord("A") + i), c=c) + "\n" for i, c in enumerate(options))


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
# Other videos are files of any kind OpenCV decodes (mp4, webm, avi, gif). The clean protocol applies the
# bounds on every bounded task. The paper's own script applied them to the frame folder only, took segment
# midpoints there and on the .avi (Fine-grained Pose) and .webm (Action Antonym) tasks, and a uniform pick
# over the whole file on every other task, the four other bounded ones included.
MVBENCH_FRAME_FOLDERS = {"tvqa/frames_fps3_hq": 3}
MVBENCH_SEGMENTS = ("Fine-grained Pose", "Action Antonym", "Episodic Reasoning")


def read_mvbench(root, mode, protocol="clean"):
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
            question, answer = need(item, "question", where), str(need(item, "answer", where))
            if protocol == "original":
                meta["frames_rule"] = "segments" if task in MVBENCH_SEGMENTS else "uniform"
                meta["body"] = (f"{question}\nOptions:\n" + lettered(options, "{L}. {c}")).rstrip()
            samples.append(mc_sample(video, question, options, letter_of(answer, options, where), mode, **meta))
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


def read_videomme(root, mode, protocol="clean"):
    samples = []
    for i, row in enumerate(read_videomme_rows(os.path.join(root, "videomme"))):
        where = f"Video-MME row {i}"
        video_id = row.get("videoID") or need(row, "video_id", where)
        letters, options = [], []
        for o in need(row, "options", where):
            m = re.match(r"\s*([A-Z])[.)]\s*(.*)", str(o), re.DOTALL)  # "A. text" -> "A", "text"
            letters.append(m.group(1) if m else chr(ord("A") + len(letters)))
            options.append(m.group(2) if m else str(o))
        answer, question, meta = str(need(row, "answer", where)).strip(), need(row, "question", where), {}
        if protocol == "original":  # the options as given; their letters are what precedes the first "."
            letters = [str(o).split(".")[0] for o in need(row, "options", where)]
            meta = dict(body=f"{question}\nOptions:\n" + "\n".join(map(str, row["options"])), choices=letters,
                        frames_rule="unique")
        letter = letter_of(answer, letters, where, "option letters")  # checked under both protocols
        letter = answer if protocol == "original" else letter  # the original keeps the benchmark's own letter
        samples.append(mc_sample(os.path.join(root, "data", f"{video_id}.mp4"), question, options, letter, mode,
                                 line=str(row.get("question_id", i)), duration=need(row, "duration", where),
                                 task_type=row.get("task_type"), **meta))
    return samples


# MLVU dev set (MLVU/MVLU): json/<k>_<task>.json for the 7 multiple-choice tasks (8_sub_scene and 9_summary
# are open generation, not scored here), each a list of {"video", "question", "candidates", "answer" (text)}.
# Videos under video/<k>_<task>/ as published (and as the paper's script reads them), or video/<task>/ as
# MLVU's own evaluation code names the folders: whichever exists.
MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")


def read_mlvu(root, mode, protocol="clean"):
    samples = []
    for name in MLVU_TASKS:
        task = name.split("_", 1)[1]
        path = os.path.join(root, "json", name + ".json")
        folders = [os.path.join(root, "video", name), os.path.join(root, "video", task)]
        folder = next((f for f in folders if os.path.isdir(f)), folders[0])
        for i, item in enumerate(read_json(path, f"MLVU task {task!r} (expected the 7 task files in json/)")):
            where = f"{path} item {i}"
            options, question = [str(c) for c in need(item, "candidates", where)], need(item, "question", where)
            meta = {"body": (f"{question}\n" + lettered(options, "({L}) {c}")).rstrip(),
                    "frames_rule": "unique"} if protocol == "original" else {}
            samples.append(mc_sample(os.path.join(folder, need(item, "video", where)), question, options,
                                     letter_of(str(need(item, "answer", where)), options, where), mode,
                                     line=f"{name}:{i}", task=task, **meta))
    return samples


# MMVU (yale-nlp/MMVU): validation.json (at the root as on Hugging Face, or data/validation.json as in the
# GitHub repository), a list of {"id", "video" (a URL into the dataset repo, or a relative path),
# "question_type", "question", "choices" {letter: text}, "answer" (a letter), "metadata": {"subject"}}.
# Only the multiple-choice items are scored, as in the paper; open-ended ones are left out.
MMVU_URL = "/resolve/main/"  # https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4


def read_mmvu(root, mode, protocol="clean"):
    paths = [os.path.join(root, "validation.json"), os.path.join(root, "data", "validation.json")]
    path = next((p for p in paths if os.path.exists(p)), paths[0])
    samples = []
    for i, item in enumerate(read_json(path, "MMVU")):
        where = f"{path} item {i}"
        if need(item, "question_type", where) != "multiple-choice":
            continue
        choices, question, meta = need(item, "choices", where), need(item, "question", where), {}
        if protocol == "original":  # every choice, even an empty one, as the original lists them
            meta = dict(body=f"{question}\n" + "\n".join(f"{k}. {v}" for k, v in choices.items()),
                        choices=list(choices), frames_rule="uniform")
        else:
            choices = {k: v for k, v in choices.items() if str(v).strip()}
        answer = str(need(item, "answer", where)).strip()
        letter = letter_of(answer, list(choices), where, "choices")  # checked under both protocols
        letter = answer if protocol == "original" else letter  # the original keeps the benchmark's own letter
        video = need(item, "video", where)
        video = video.split(MMVU_URL, 1)[1] if MMVU_URL in video else video
        samples.append(mc_sample(os.path.join(root, video), question, [str(v) for v in choices.values()], letter,
                                 mode, line=str(item.get("id", i)),
                                 subject=(item.get("metadata") or {}).get("subject", "all"), **meta))
    return samples


# name: (reader, the meta field each table row groups by, how the benchmark's own average is taken)
BENCHMARKS = {"mvbench": (read_mvbench, "task", "micro"), "videomme": (read_videomme, "duration", "micro"),
              "mlvu": (read_mlvu, "task", "macro"), "mmvu": (read_mmvu, "subject", "micro")}


# ----------------------------------------------------------------------------- averages and the table

def summarize(records, group, average, order=(), missing=()):
    """Accuracy per group (task, duration or subject) and the benchmark's average: "micro" over all answered
    items, or "macro", the mean of the groups' accuracies. records: evaluate's; missing: metas of items
    whose video could not be read, counted apart. An unparsed answer counts as wrong; "guessed" is the
    accuracy expected had each been a uniform random guess, as the original code did (under the original
    protocol, records with "guessed" true were: counted unparsed, right or wrong as the guess fell)."""
    zero = dict(correct=0, total=0, unparsed=0, missing=0, guess=0.0)
    groups = {name: dict(zero) for name in order}
    for r in records:
        g = groups.setdefault(r[group], dict(zero))
        g["total"] += 1
        g["correct"] += bool(r["correct"])
        g["unparsed"] += r["pred"] is None or bool(r.get("guessed"))
        if r["pred"] is None:
            g["guess"] += 1 / r["num_options"]
    for m in missing:
        groups.setdefault(m[group], dict(zero))["missing"] += 1
    for g in groups.values():
        guess = g.pop("guess")
        g["accuracy"] = g["correct"] / g["total"] if g["total"] else None
        g["guessed"] = (g["correct"] + guess) / g["total"] if g["total"] else None
    out = {"average_kind": average, "groups": groups,
           **{key: sum(g[key] for g in groups.values()) for key in ("correct", "total", "unparsed", "missing")}}
    answered = [g for g in groups.values() if g["total"]]
    weights = [1 if average == "macro" else g["total"] for g in answered]  # macro: each group alike
    for key, field in (("average", "accuracy"), ("average_guessed", "guessed")):
        out[key] = sum(w * g[field] for w, g in zip(weights, answered)) / sum(weights) if answered else None
    return out


def format_table(title, summary, group):
    """The summary as text: one row per group, then the average, accuracies in percent."""
    pct = lambda x: f"{'-':>5}" if x is None else f"{100 * x:5.1f}"  # noqa: E731

    def row(name, g):
        return (f"{str(name):<{width}}  {pct(g['accuracy'])}  {g['correct']:>6}/{g['total']:<6}  "
                f"{g['unparsed']:>8}  {g['missing']:>7}  {pct(g['guessed']):>9}")

    width = max([len(str(n)) for n in summary["groups"]] + [28])
    head = f"{group:<{width}}  {'acc %':>5}  {'correct/total':>13}  {'unparsed':>8}  {'missing':>7}  {'guessed %':>9}"
    average = {**summary, "accuracy": summary["average"], "guessed": summary["average_guessed"]}
    return "\n".join([title, head, "-" * len(head), *(row(n, g) for n, g in summary["groups"].items()),
                      "-" * len(head), row(f"average ({summary['average_kind']})", average)])
