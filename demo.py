"""The CPU demo: the whole method on synthetic videos, small enough for a laptop CPU.

    python demo.py --seed 0 --out runs/demo [--reward-reasoning] [--device cpu]

A synthetic task is written as real video files and annotations in the paper's formats, so the demo runs
the same code as a real run: four kinds of question about 8-frame clips (the colour of a moving square,
its direction, which colour appears first, how many times a circle flashes), four lettered options. A
~1M-parameter model of the published architecture (frozen random vision tower, the group resampler with
one group per frame, 3-layer decoder) learns them from scratch in three stages through train.py: a base
stage on plain descriptions of separate videos (standing in for the pretraining that gave the published
base model its sight), the cold start on 64 reasoning answers, then GRPO on 2,000 questions with only the
reward to learn from. Every stage asks its questions as sample.py does (the evaluation's multiple-choice
prompt), so a question typed on sample.py's command line is a question the model was trained on. Both
checkpoints are then asked 200 held-out questions, and their reasoning is checked against what is true of
each clip (docs/reasoning.md); the summary is the last line printed, as JSON.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time

import cv2
import numpy as np
import torch

import data
import grpo
from model import ConnectorConfig, TextConfig, TinyLLaVA, TinyLLaVAConfig, VisionConfig
import sample
import train
import weights


# ----------------------------------------------------------------------------- a synthetic video task
# Each kind of question needs the video, three of them its temporal order; options come in a fixed order per
# kind (a from-scratch model learns them in minutes), the right letter is spread evenly over A-D.

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (50, 80, 230), "yellow": (230, 220, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TASKS = {"color": ("What color is the moving square?", list(COLOURS)),
         "direction": ("Which direction does the glass square move?", list(DIRECTIONS)),
         "order": ("Which color appears first?", list(COLOURS)),
         "count": ("How many times does the white circle flash?", ["1", "2", "3", "4"])}
SIZE, FRAMES, FPS = 64, 8, 4  # 64x64 pixels, 8 frames, 2 seconds
# What each task's reasoning states, as render() writes it: one group captures the option it names.
FACTS = {"color": r"square is (\w+)", "direction": r"moves (\w+)", "order": r"(\w+) is first", "count": r"flashes (\w+) times"}


def _square(frame, x, y, side, colour):
    cv2.rectangle(frame, (int(x), int(y)), (int(x + side), int(y + side)), COLOURS[colour][::-1], -1)  # BGR


def background():
    """(SIZE, SIZE, 3) BGR: a colour ramp, red growing to the right and green downwards. A frozen random
    tower barely keeps where a patch is, and the resampler pools each frame's patches, so position has to
    show in what the pixels are: the glass square of the direction task takes its colour from the ramp."""
    ramp = np.linspace(20, 140, SIZE)
    bg = np.full((SIZE, SIZE, 3), 40, np.uint8)
    bg[..., 2], bg[..., 1] = ramp[None, :], ramp[:, None]
    return bg


def render(task, answer, rng):
    """Frames (FRAMES, SIZE, SIZE, 3) BGR for one question, and a short correct reasoning."""
    frames = np.repeat(background()[None], FRAMES, 0)
    t_mid = (FRAMES - 1) / 2
    if task == "color":  # a square drifting a little: only its colour matters
        side, (dx, dy) = rng.randint(22, 27), DIRECTIONS[list(DIRECTIONS)[rng.randint(4)]]
        x, y = rng.randint(12, SIZE - 12 - side, 2)
        for t in range(FRAMES):
            _square(frames[t], x + dx * (t - t_mid) * 1.5, y + dy * (t - t_mid) * 1.5, side, answer)
        why = f"The square is {answer}."
    elif task == "direction":  # ~35 px of travel across the clip
        side, (dx, dy) = rng.randint(22, 27), DIRECTIONS[answer]
        x, y = rng.randint(SIZE // 2 - 4 - side // 2, SIZE // 2 + 4 - side // 2, 2)
        for t in range(FRAMES):  # glass: the ramp shows through, brighter (BGR: blue full, green and red doubled)
            x0, y0 = int(x + dx * (t - t_mid) * 5), int(y + dy * (t - t_mid) * 5)
            box = frames[t, max(0, y0):y0 + side + 1, max(0, x0):x0 + side + 1]
            box[...] = np.clip(box.astype(int) * [0, 2, 2] + [255, 0, 0], 0, 255)
        start, end = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"), "down": ("top", "bottom")}[answer]
        why = f"The square starts at the {start} and ends at the {end}, so it moves {answer}."
    elif task == "order":  # one square from frame 0-1 on, another from frame 4-5 on, side by side
        second = [c for c in COLOURS if c != answer][rng.randint(3)]
        side, t1, t2 = rng.randint(22, 27), rng.randint(0, 2), rng.randint(4, 6)
        y1, y2 = rng.randint(2, SIZE - 2 - side, 2)
        x1, x2 = rng.randint(1, 31 - side), rng.randint(33, 63 - side)
        if rng.randint(2):
            x1, x2 = x2, x1
        for t in range(FRAMES):
            if t >= t1:
                _square(frames[t], x1, y1, side, answer)
            if t >= t2:
                _square(frames[t], x2, y2, side, second)
        why = f"The {answer} square is there from the start and the {second} one comes later, so {answer} is first."
    elif task == "count":  # a large circle shown on k frames, never two in a row
        # Large (a third of the frame) so each flash stands out in its frame's 4 latents. With an eighth of
        # the frame, a development cold start counted 7 of 12 one-flash clips as two, and 8 of 12 three-flash
        # clips as four; its GRPO model then answered B (two) to every one-flash clip.
        k = int(answer)
        while True:
            shown = np.sort(rng.choice(FRAMES, k, replace=False))
            if np.all(np.diff(shown) > 1):
                break
        r = rng.randint(20, 25)
        x, y = rng.randint(24, SIZE - 24, 2)
        for t in shown:
            cv2.circle(frames[t], (int(x), int(y)), int(r), (255, 255, 255), -1)
        why = f"The circle flashes {k} times."
    else:
        raise ValueError(f"unknown synthetic task {task!r}")
    return frames, why


def _write_video(path, frames):
    """mp4 (mp4v) where OpenCV can write it, else MJPG in an .avi. -> the path written."""
    for ext, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
        out = os.path.splitext(path)[0] + ext
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*codec), FPS, (SIZE, SIZE))
        if writer.isOpened():
            for f in frames:
                writer.write(f)
            writer.release()
            return out
    raise data.VideoError(f"{path}: OpenCV cannot write mp4v or MJPG video here")


def make_synthetic(out_dir, n_train=2000, n_coldstart=64, n_test=200, seed=0, n_captions=0):
    """Write the synthetic task to out_dir: videos/, grpo.jsonl (NextQA GRPO format) and train.jsonl (plain multiple
    choice, as the evaluation asks) for the training videos, coldstart.json (cold-start format, with reasoning, asked as
    the evaluation asks), heldout.jsonl and test.jsonl (with each task's FACTS pattern as "fact") for the held-out
    videos, and captions.json (cold-start format, n_captions more videos of their own: each question answered with a
    plain description of its video, no letter; it stands in for the pretraining that gave the published base model its
    sight). Deterministic in `seed`; skipped if already written with the same settings.
    -> {"root", "grpo", "train", "coldstart", "heldout", "test", "captions"} paths."""
    ext = dict(grpo=".jsonl", train=".jsonl", coldstart=".json", heldout=".jsonl", test=".jsonl", captions=".json")
    paths = {"root": out_dir, **{k: os.path.join(out_dir, k + e) for k, e in ext.items()}}
    settings = {"n_train": n_train, "n_coldstart": n_coldstart, "n_test": n_test, "n_captions": n_captions, "seed": seed, "version": 10}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path) and all(os.path.exists(p) for p in paths.values()):
        with open(meta_path) as f:
            if json.load(f) == settings:
                return paths
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer.json"))  # trained on the old texts
    rng = np.random.RandomState(seed)
    kinds = [(task, opt) for task in TASKS for opt in range(4)]  # 16 (task, answer) cells
    # each split cycles through the cells, then is shuffled: every task x letter equally often
    cells = [kinds[i % 16] for n in (n_train, n_coldstart, n_test, n_captions) for i in rng.permutation(n)]
    rows = []
    for i, (task, k) in enumerate(cells):
        question, options = TASKS[task]
        frames, why = render(task, options[k], rng)
        video = _write_video(os.path.join(out_dir, "videos", f"{i:05d}.mp4"), frames)
        problem = question + "\nOptions:\n" + data.format_options(options)
        rows.append(dict(video="./videos/" + os.path.basename(video), task=task, question=question, options=options,
                         letter="ABCD"[k], why=why, problem=problem))
    train, cold = rows[:n_train], rows[n_train:n_train + n_coldstart]
    test, captions = rows[n_train + n_coldstart:n_train + n_coldstart + n_test], rows[n_train + n_coldstart + n_test:]

    def grpo_row(r):
        return {"problem": r["problem"], "solution": f"<answer>{r['letter']}</answer>", "video_filename": r["video"], "task": r["task"]}

    def write_jsonl(path, items):
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in items)

    write_jsonl(paths["grpo"], [grpo_row(r) for r in train])
    write_jsonl(paths["heldout"], [grpo_row(r) for r in test])
    mc = lambda r: {"video": r["video"], "question": r["question"], "options": r["options"], "answer": r["letter"],  # noqa: E731
                    "task": r["task"], "fact": FACTS[r["task"]]}
    write_jsonl(paths["train"], [mc(r) for r in train])
    write_jsonl(paths["test"], [mc(r) for r in test])
    chat = lambda r, question, answer: {"video": r["video"], "task": r["task"], "conversations": [  # noqa: E731
        {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}  # cold-start format
    with open(paths["coldstart"], "w") as f:
        json.dump([chat(r, data.mc_question(r["question"], r["options"]),
                        f"<think>{r['why']}</think> <answer>{r['letter']}</answer>") for r in cold], f, indent=1)
    with open(paths["captions"], "w") as f:  # what the base model learns to see, on videos of their own
        json.dump([chat(r, r["problem"], r["why"]) for r in captions], f, indent=1)
    with open(meta_path, "w") as f:
        json.dump(settings, f)
    return paths


def synthetic_tokenizer(paths, vocab_size=512):
    """Train (once) and load the small tokenizer of the synthetic task, saved as ROOT/tokenizer.json."""
    path = os.path.join(paths["root"], "tokenizer.json")
    if not os.path.exists(path):
        texts = [data.build_prompt(s.question) + " " + s.solution for f in (paths["coldstart"], paths["train"]) for s in data.read_samples(f)[0]]
        data.train_tokenizer(texts, path, vocab_size)
    return data.Tokenizer(path)


# ----------------------------------------------------------------------------- the demo


def demo_config(vocab_size):
    # 32x32 frames in 8x8 patches (15 kept a frame), one resampler group of 4 latents per frame: 32 video tokens.
    return TinyLLaVAConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                            image_size=32, patch_size=8),
        connector=ConnectorConfig(connector_type="groupresampler", num_queries=4 * DEMO["frames"], group=DEMO["frames"],
                                  num_resampler_layers=1, vision_hidden_size=64, hidden_size=128, heads=2),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
        raw={"num_frames": DEMO["frames"]})


# The base stage runs 3 epochs: after 2, direction or flashes were still unseen on some seeds.
DEMO = dict(frames=8, n_train=2000, n_coldstart=64, n_test=200, n_captions=4000,
            base=dict(lr=1e-3, epochs=3, prompts_per_step=16, micro_batch=16),
            sft=dict(lr=1e-3, epochs=12, prompts_per_step=8, micro_batch=8),
            grpo=dict(lr=2e-4, steps=450, prompts_per_step=8, micro_batch=8, group_size=8, max_new_tokens=40, beta=0.01,
                      eval_every=90))


def reasoning_reward(completion, solution):
    """--reward-reasoning: 1.0 when the thinking states the true fact of exactly one task, else 0.0. A training
    row gives only the letter; each task's options come in a fixed order, so the letter names the true fact of
    whichever task the thinking speaks of (the check cannot see the question)."""
    return float(sum(sample.check_reasoning(completion, FACTS[t], TASKS[t][1], grpo._answer(solution), None)[0] for t in TASKS) == 1)


def report(results, test, out):
    """Print the per-task table and one held-out question with a ready-to-run ask command -> the summary's figures."""
    tasks = sorted({r["task"] for r in results["sft"]["records"]})
    figures = {}
    for key, name in (("correct", "accuracy"), ("reasoning_right", "reasoning_accuracy"),
                      ("reasoning_agrees", "answer_agrees_with_reasoning")):
        figures[name] = {stage: {t: round(float(np.mean([r[key] for r in res["records"] if t in ("all", r["task"])])), 3)
                                 for t in tasks + ["all"]} for stage, res in results.items()}
        print(f"\n{'held-out ' + name:<36}" + "".join(f"{t:>10}" for t in tasks + ["all"]))
        for stage in results:
            print(f"{stage:<36}" + "".join(f"{figures[name][stage][t]:>10.3f}" for t in tasks + ["all"]))
    # one held-out question, the first on which the two models answer differently (else the first)
    pairs = list(zip(results["sft"]["records"], results["grpo"]["records"]))
    a, b = next(((a, b) for a, b in pairs if a["output"] != b["output"]), pairs[0])
    s = next(s for s in test if s.video == a["video"])
    print(f"\none held-out question ({a['video']}):\n{s.question}"
          f"\n  right answer: {a['answer']}\n  cold start: {a['output'].strip()}\n  GRPO:       {b['output'].strip()}\n")
    ask = ["python", "sample.py", "--ckpt", os.path.join(out, "grpo", "checkpoint"), "--video", s.video,
           "--question", s.question.split("\n")[0], "--options", *s.meta["options"]]
    print("ask the GRPO model a question of your own:\n  " + shlex.join(ask) + "\n")
    return figures


def demo(out, seed, device="", reward_reasoning=False):
    t0 = time.time()
    paths = make_synthetic(os.path.join(out, "data"), seed=seed, **{k: v for k, v in DEMO.items() if k[:2] == "n_"})
    tok = synthetic_tokenizer(paths)
    init = os.path.join(out, "init")
    torch.manual_seed(seed)
    model = TinyLLaVA(demo_config(tok.vocab_size))
    weights.save_pretrained(model, init)
    shutil.copy(os.path.join(paths["root"], "tokenizer.json"), os.path.join(init, "tokenizer.json"))
    common = dict(seed=seed, frames=DEMO["frames"], device=device, save_every=10**9, overwrite=True)
    # The published chain starts from a base model that already sees; here a short supervised stage on
    # plain descriptions of separate videos plays that part (on the GRPO videos themselves it would
    # memorise their answers). Then the paper's two stages, GRPO scored on the held-out file as it goes.
    train.train(train.TrainConfig(stage="sft", init=init, data=paths["captions"], out=os.path.join(out, "base"), **common, **DEMO["base"]))
    train.train(train.TrainConfig(stage="sft", init=os.path.join(out, "base", "checkpoint"), data=paths["coldstart"],
                      out=os.path.join(out, "sft"), **common, **DEMO["sft"]))
    train.train(train.TrainConfig(stage="grpo", init=os.path.join(out, "sft", "checkpoint"), data=paths["train"],
                                  out=os.path.join(out, "grpo"), eval_data=paths["test"], **common, **DEMO["grpo"]),
                reward_fns={"reasoning": reasoning_reward} if reward_reasoning else None)

    test = data.read_samples(paths["test"])[0]  # held-out questions, asked as sample.py asks them
    results = {}
    for stage in ("sft", "grpo"):
        model, tok = sample.load(os.path.join(out, stage, "checkpoint"), device or None)
        results[stage] = sample.evaluate(model, tok, test, "reason", batch_size=50, frames=DEMO["frames"], max_new_tokens=DEMO["grpo"]["max_new_tokens"])
    figures = report(results, test, out)
    summary = {"sft_accuracy": results["sft"]["accuracy"], "grpo_accuracy": results["grpo"]["accuracy"],
               "per_task": {stage: {t: v for t, v in f.items() if t != "all"} for stage, f in figures["accuracy"].items()},
               **{k: figures[k] for k in ("reasoning_accuracy", "answer_agrees_with_reasoning")},
               "sft_unparsed": results["sft"]["unparsed"], "grpo_unparsed": results["grpo"]["unparsed"],
               "n_test": len(test), "seed": seed, "reward_reasoning": reward_reasoning, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description="The CPU demo: synthetic videos, a small model, the cold start then GRPO, "
                                "both evaluated (accuracy and reasoning).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: (print(f"demo.py: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the model and the training")
    p.add_argument("--out", default="runs/demo", help="folder for the data, the three stages and their checkpoints")
    p.add_argument("--reward-reasoning", action="store_true", help="add the fact check of the thinking to the GRPO "
                   "reward (+1 when it states the clip's true fact; not the paper's reward)")
    p.add_argument("--device", default="", help="cuda, cpu, ... (default: cuda if available)")
    args = p.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        p.error("the demo runs in one process; under torchrun run train.py on the demo's OUT/data files")
    try:
        demo(args.out, args.seed, args.device, args.reward_reasoning)
        return 0
    except (train.RunError, data.DataError, data.VideoError, weights.CheckpointError, train.Diverged) as e:
        print(f"demo.py: {e}", file=sys.stderr)
        return 1 if isinstance(e, train.Diverged) else 2


if __name__ == "__main__":
    sys.exit(main())
