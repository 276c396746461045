"""Cold-start SFT and GRPO for TinyLLaVA-Video, on one GPU or a CPU.

The paper's recipe in two stages (DESIGN.md section 3):
  1. cold start: supervised fine-tuning on a handful of reasoning answers (lr 1e-5, constant, 1 epoch),
     so the model learns to think in <think> tags and answer in <answer> tags;
  2. GRPO: for each question sample G = 8 answers, reward them (accuracy, format, thinking length),
     and push the policy towards the better-than-average ones, with a KL leash to the frozen start
     model (lr 1e-6, cosine with 3% warmup, 8 prompts per optimizer step).

The vision tower is frozen in both stages: its features are computed once per video and shared by the
rollout, the reference and the policy passes. The reference model is a frozen copy of the connector
and decoder. Weights stay in fp32 (the paper's lr 1e-6 is below bf16's resolution), compute runs in
bf16 on a GPU.

    python train.py                                   # the CPU demo: synthetic videos, SFT, then GRPO
    python train.py --stage sft --init BASE_DIR --data nextqa-coldstart-16.json --out runs/sft
    python train.py --stage grpo --init runs/sft/checkpoint --data nextqa_0-30s.jsonl --root videos --out runs/grpo

Every step appends its metrics to OUT/metrics.jsonl and redraws OUT/curves.png; OUT/checkpoint holds
the latest weights (loadable by sample.py) with the optimizer, scheduler, RNG and data position, so
`--resume` continues the run exactly.
"""

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import grpo as G
import model as M


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    stage: str = "grpo"  # "sft" (cold start) or "grpo"
    init: str = ""  # a TinyLLaVA checkpoint directory to start from
    vision: str = ""  # or a SigLIP directory ...
    llm: str = ""  # ... and a Qwen2 directory, with a fresh connector
    connector: str = "groupresampler"  # connector type when starting from parts
    data: str = ""  # NextQA GRPO .jsonl or cold-start .json
    root: str = ""  # directory the video paths are relative to (default: the data file's)
    out: str = "runs/demo"
    seed: int = 0
    lr: float = 0.0  # 0: the paper's, 1e-5 for sft and 1e-6 for grpo
    schedule: str = ""  # "constant" or "cosine"; empty: constant for sft, cosine for grpo
    warmup: float = 0.03  # fraction of steps with linear warmup (cosine only)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    steps: int = 0  # optimizer steps; 0: epochs x (samples / prompts_per_step)
    stop_after: int = 0  # stop (with a checkpoint) after this many steps, e.g. to time-box a run
    prompts_per_step: int = 8  # prompts (grpo) or samples (sft) per optimizer step
    micro_batch: int = 1  # prompts (or samples) per forward pass; gradients are accumulated
    group_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    beta: float = 0.01
    noise_std: float = 0.02
    scale: str = "group"  # advantage scaling: "group" (paper), "batch", "none"
    loss_type: str = "grpo"  # "grpo" (paper), "bnpo", "dr_grpo", "dapo"
    updates_per_rollout: int = 1  # >1: clipped ratio against the sampling policy
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    mask_truncated: bool = False
    skip_zero_variance: bool = False
    temporal: bool = False  # Video-R1's T-GRPO bonus from rollouts on shuffled frames
    frames: int = 16
    max_len: int = 3072
    device: str = ""  # default: cuda if available
    grad_checkpointing: bool = True  # ignored on CPU
    save_every: int = 50
    resume: bool = False

    def __post_init__(self):
        if self.stage not in ("sft", "grpo"):
            raise ValueError(f"--stage must be sft or grpo, not {self.stage!r}")
        self.lr = self.lr or (1e-5 if self.stage == "sft" else 1e-6)
        self.schedule = self.schedule or ("constant" if self.stage == "sft" else "cosine")


HELP = {
    "stage": "sft (cold start on reasoning answers) or grpo",
    "init": "TinyLLaVA checkpoint directory to start from (config.json + safetensors + tokenizer.json)",
    "vision": "SigLIP checkpoint directory (with --llm: start from parts with a fresh connector)",
    "llm": "Qwen2 checkpoint directory (its tokenizer.json is used)",
    "connector": "connector type when starting from parts: groupresampler, naiveresampler, mlp2x_gelu",
    "data": "training data: NextQA GRPO .jsonl or cold-start .json",
    "root": "directory video paths are relative to (default: the data file's directory)",
    "out": "run directory: metrics.jsonl, curves.png, checkpoint/",
    "seed": "seed for data order, sampling and advantage noise",
    "lr": "peak learning rate (0: the paper's, 1e-5 sft, 1e-6 grpo)",
    "schedule": "constant or cosine (default: constant for sft, cosine for grpo)",
    "warmup": "fraction of the steps spent in linear warmup (cosine)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "epochs": "passes over the data",
    "steps": "optimizer steps (0: from epochs)",
    "stop_after": "stop after this many steps, keeping the schedule of --steps (resume later)",
    "prompts_per_step": "prompts (grpo) or samples (sft) per optimizer step; the paper uses 8",
    "micro_batch": "prompts or samples per forward pass (gradient accumulation up to --prompts-per-step)",
    "group_size": "completions sampled per prompt (G)",
    "max_new_tokens": "longest completion",
    "temperature": "sampling temperature",
    "top_k": "sample from the k most likely tokens (0: all)",
    "top_p": "nucleus sampling threshold (1: off)",
    "beta": "weight of the KL to the reference model (0: no reference)",
    "noise_std": "std of the Gaussian noise added to advantages",
    "scale": "advantage scaling: group (paper), batch, none",
    "loss_type": "grpo (paper), bnpo, dr_grpo, dapo",
    "updates_per_rollout": "optimizer steps per batch of rollouts (>1 uses the clipped ratio)",
    "epsilon_low": "lower clip range of the ratio",
    "epsilon_high": "upper clip range of the ratio (0.28 in DAPO)",
    "mask_truncated": "leave completions that hit --max-new-tokens out of the loss",
    "skip_zero_variance": "leave groups whose rewards are all equal out of the loss",
    "temporal": "T-GRPO: +0.3 to correct answers when ordered frames beat shuffled ones",
    "frames": "frames sampled uniformly per video",
    "max_len": "truncate sequences (prompt + answer) to this many token ids",
    "device": "cuda, cpu, ... (default: cuda if available)",
    "grad_checkpointing": "recompute decoder layers in backward to save memory (GPU)",
    "save_every": "write the checkpoint every N steps (and at the end)",
    "resume": "continue from OUT/checkpoint",
}


# ----------------------------------------------------------------------------- model, data, optimizer


def load_model(cfg, device):
    """The policy and its tokenizer, from a checkpoint or from parts, with fp32 master weights."""
    if cfg.init:
        model = M.TinyLLaVA.from_pretrained(cfg.init, device=device, dtype=torch.float32)
        tok = D.Tokenizer(cfg.init)
    elif cfg.vision and cfg.llm:
        model = M.TinyLLaVA.from_parts(cfg.vision, cfg.llm, connector=cfg.connector, device=device, dtype=torch.float32)
        tok = D.Tokenizer(cfg.llm)
    else:
        raise SystemExit("train.py: give --init DIR, or --vision DIR and --llm DIR (or no flags at all for the demo)")
    return model, tok


def freeze_vision(model):
    model.vision_tower.requires_grad_(False)
    model.vision_tower.eval()


def make_reference(model):
    """A frozen copy of connector + decoder; the vision tower is shared (it is frozen anyway)."""
    tower = model.vision_tower
    model.vision_tower = None  # not copied
    ref = copy.deepcopy(model)
    model.vision_tower = ref.vision_tower = tower
    return ref.requires_grad_(False).eval()


def make_schedule(optimizer, cfg, total):
    warm = max(1, round(cfg.warmup * total)) if cfg.schedule == "cosine" else 0

    def factor(step):  # step counts finished optimizer steps
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def data_order(n, epoch, seed):
    """The sample order of one epoch: a fixed permutation per (seed, epoch), so resuming needs only the step."""
    return np.random.RandomState(seed * 1000 + epoch).permutation(n)


def step_samples(samples, step, cfg):
    """The samples of optimizer step `step` (epochs wrap around)."""
    per_epoch = max(1, len(samples) // cfg.prompts_per_step)
    epoch, i = divmod(step, per_epoch)
    order = data_order(len(samples), epoch, cfg.seed)
    return [samples[j] for j in order[i * cfg.prompts_per_step:(i + 1) * cfg.prompts_per_step]]


class VideoLoader:
    """Loads and preprocesses videos, skipping (and counting) the ones that cannot be read."""

    def __init__(self, frames, size):
        self.frames, self.size, self.skipped = frames, size, []

    def __call__(self, samples):
        """-> the samples that loaded and their pixels (B, T, 3, size, size)."""
        good, pixels = [], []
        for s in samples:
            try:
                pixels.append(D.load_video(s.video, num_frames=self.frames, size=self.size))
                good.append(s)
            except D.VideoError as e:
                self.skipped.append(str(e))
                tqdm.write(f"skipping sample: {e}")
        return good, (torch.stack(pixels) if pixels else None)


# ----------------------------------------------------------------------------- one optimizer step


def autocast(device):
    """bf16 compute on a GPU over fp32 weights; plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def sft_labels(labels, input_ids, num_video_tokens):
    """Labels (B, L) -> (B, L-1+Q): -100 for the Q video tokens spliced at the placeholder."""
    out = []
    for row, ids in zip(labels, input_ids):
        p = int((ids == M.IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        out.append(torch.cat([row[:p], row.new_full((num_video_tokens,), -100), row[p + 1:]]))
    return torch.stack(out)


def sft_step(model, tok, samples, load, cfg, device):
    """Cross-entropy on the answer tokens, accumulated over micro-batches. -> metrics."""
    model.train()
    freeze_vision(model)
    total_tokens, total_loss, n = 0, 0.0, 0
    batches = [samples[i:i + cfg.micro_batch] for i in range(0, len(samples), cfg.micro_batch)]
    denom = sum(len(b) for b in batches)
    for batch in batches:
        batch, pixels = load(batch)
        if not batch:
            continue
        ids, labels, mask = D.collate_sft([tok.sft_ids(s.question, s.solution, cfg.max_len) for s in batch], tok.pad_id)
        ids, labels, mask, pixels = ids.to(device), labels.to(device), mask.to(device), pixels.to(device)
        with torch.no_grad():
            feats = model.vision_features(pixels)
        with autocast(device):
            x, xmask = model.embed(ids, model.connect(feats), mask)
            logits = model.language_model.logits(model.language_model.model(x, xmask))
        labels = sft_labels(labels, ids, x.shape[1] - ids.shape[1] + 1)
        # mean over the answer tokens of each sample, then over samples (so long answers do not dominate)
        tok_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
        valid = (labels[:, 1:] != -100).float()
        per_sample = (tok_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
        loss = per_sample.sum() / denom
        if not torch.isfinite(loss):
            return {"nan": 1.0}
        loss.backward()
        total_loss += per_sample.sum().item()
        total_tokens += int(valid.sum())
        n += len(batch)
    return {"loss": total_loss / max(n, 1), "tokens": float(total_tokens), "samples": float(n)}


def grpo_step(model, ref, tok, samples, load, cfg, device, gen, apply_update):
    """Rollouts for every prompt of the step, then `updates_per_rollout` policy updates. -> metrics.

    With several updates per rollout, `apply_update()` takes the optimizer step between them (the
    caller takes the last one).
    The gradient is accumulated over micro-batches of prompts and divided so that the loss is the mean
    over prompts, as if the whole step were one batch."""
    t0 = time.perf_counter()
    G_, rolls, texts_all = cfg.group_size, [], []
    times = {"rollout": 0.0, "reference": 0.0, "policy": 0.0}
    for i in range(0, len(samples), cfg.micro_batch):
        batch, pixels = load(samples[i:i + cfg.micro_batch])
        if not batch:
            continue
        ids, pmask = D.collate_prompts([tok.prompt_ids(s.question, cfg.max_len) for s in batch], tok.pad_id)
        ids, pmask, pixels = ids.to(device), pmask.to(device), pixels.to(device)
        t = time.perf_counter()
        model.eval()
        with torch.no_grad(), autocast(device):
            feats = model.vision_features(pixels)  # frozen: computed once, shared by every pass below
            ro = G.rollout(model, ids, model.connect(feats), tok.eos_id, tok.pad_id, pmask, G_, cfg.max_new_tokens,
                           cfg.temperature, cfg.top_k, cfg.top_p, generator=gen)
        texts = [tok.decode(r[m > 0]) for r, m in zip(ro.completion_ids.cpu(), ro.mask.cpu())]
        solutions = [s.solution for s in batch for _ in range(G_)]
        sc = G.score(texts, solutions)
        if cfg.temporal:  # T-GRPO: the same prompts on shuffled frames; only their accuracy is used
            with torch.no_grad(), autocast(device):
                shuf = model.vision_features(G.shuffle_frames(pixels, generator=gen))
                ro_s = G.rollout(model, ids, model.connect(shuf), tok.eos_id, tok.pad_id, pmask, G_, cfg.max_new_tokens,
                                 cfg.temperature, cfg.top_k, cfg.top_p, generator=gen)
            texts_s = [tok.decode(r[m > 0]) for r, m in zip(ro_s.completion_ids.cpu(), ro_s.mask.cpu())]
            acc_s = G.score(texts_s, solutions)["accuracy"]
            sc["reward"] = sc["reward"] + G.temporal_bonus(sc["accuracy"], acc_s, G_)
        times["rollout"] += time.perf_counter() - t
        adv = G.group_advantages(sc["reward"], G_, cfg.noise_std, cfg.scale, generator=gen).to(device)
        mask = ro.mask.clone()
        if cfg.skip_zero_variance:
            mask[G.zero_variance_groups(sc["reward"], G_).to(device)] = 0
        t = time.perf_counter()
        ref_logp = None
        if cfg.beta > 0:
            with torch.no_grad(), autocast(device):
                ref_logp = G.completion_logprobs(ref, ids, ref.connect(feats), ro.completion_ids, ro.mask, pmask, cfg.temperature)
        times["reference"] += time.perf_counter() - t
        rolls.append((ids, pmask, feats, ro, adv, mask, ref_logp, len(batch)))
        texts_all.append((ro, texts, sc))
    n_prompts = sum(r[-1] for r in rolls)
    if not n_prompts:
        return {"skipped_step": 1.0}

    t = time.perf_counter()
    model.train()
    freeze_vision(model)
    losses, kls, clips, nan = [], [], [], False
    for update in range(cfg.updates_per_rollout):
        for ids, pmask, feats, ro, adv, mask, ref_logp, n in rolls:
            with autocast(device):
                logp = G.completion_logprobs(model, ids, model.connect(feats), ro.completion_ids, ro.mask, pmask, cfg.temperature)
                old = ro.logprobs if cfg.updates_per_rollout > 1 else None
                loss, lm = G.grpo_loss(logp, old, ref_logp, adv, mask, beta=cfg.beta, loss_type=cfg.loss_type,
                                       epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                       truncated=ro.truncated if cfg.mask_truncated else None,
                                       max_completion_length=cfg.max_new_tokens)
            if not torch.isfinite(loss):
                nan = True
                break
            (loss * n / n_prompts).backward()
            losses.append(lm["loss"]), kls.append(lm["kl"]), clips.append(lm["clip_ratio"])
        if nan:
            break
        if update + 1 < cfg.updates_per_rollout:
            apply_update()
    times["policy"] = time.perf_counter() - t

    ro = concat_rollouts([r for r, _, _ in texts_all])
    texts = [x for _, tx, _ in texts_all for x in tx]
    sc = {k: torch.cat([s[k] for _, _, s in texts_all]) for k in texts_all[0][2]}
    times["step"] = time.perf_counter() - t0
    metrics = G.step_metrics(ro, texts, sc, G_, kl=float(np.mean(kls)) if kls else None, times=times)
    metrics.update(loss=float(np.mean(losses)) if losses else float("nan"), clip_ratio=float(np.mean(clips)) if clips else 0.0)
    if nan:
        metrics["nan"] = 1.0
    metrics["example"] = texts[0]
    return metrics


def concat_rollouts(rolls):
    """Rollouts of several micro-batches as one (completions padded to the longest)."""
    T = max(r.completion_ids.shape[1] for r in rolls)

    def pad(x, value=0):
        return F.pad(x, (0, T - x.shape[1]), value=value)

    return G.Rollout(torch.cat([pad(r.completion_ids) for r in rolls]), torch.cat([pad(r.mask) for r in rolls]),
                     torch.cat([pad(r.logprobs) for r in rolls]), torch.cat([r.truncated for r in rolls]), rolls[0].group_size)


# ----------------------------------------------------------------------------- checkpoints, metrics, plot


def write_checkpoint(model, tokenizer_file, state, out):
    """OUT/checkpoint, replaced atomically: written beside it, then renamed (a crash leaves the old one)."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def tokenizer_file(directory):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise SystemExit(f"train.py: no tokenizer.json in {directory}")
    return path


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path, upto=None):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def plot_curves(records, path, keys, width=640, panel=110, smooth=0.9):
    """Small multiples drawn with OpenCV: one panel per metric in `keys` against the step, the raw values
    faint and their exponential moving average (weight `smooth`, debiased) bold, each panel with its own
    y range written on it and the steps on its x axis."""
    if not records:
        return
    s0, s1 = records[0]["step"], max(records[-1]["step"], records[0]["step"] + 1)
    left, right, head, foot = 62, 16, 24, 26  # margins around each panel's plot box
    img = np.full((len(keys) * (head + panel + foot) + 8, width, 3), 255, np.uint8)
    colours = [(180, 90, 20), (40, 140, 40), (30, 30, 200), (150, 40, 150), (20, 130, 190)]
    text = lambda s, x, y, scale=0.42, c=(70, 70, 70): cv2.putText(img, s, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, c, 1, cv2.LINE_AA)
    xs = lambda s: left + (np.asarray(s) - s0) / (s1 - s0) * (width - left - right)
    for i, key in enumerate(keys):
        top, colour = i * (head + panel + foot) + head, colours[i % len(colours)]
        cv2.rectangle(img, (left, top), (width - right, top + panel), (200, 200, 200), 1)
        text(key, left, top - 7, 0.5, colour)
        for s in (s0, (s0 + s1) // 2, s1):
            text(str(s), min(xs(s) - 4 * len(str(s)), width - 9 * len(str(s)) - 4), top + panel + 17)
        pts = np.array([(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])])
        if not len(pts):
            continue
        ema = [0.0]
        for v in pts[:, 1]:
            ema.append(smooth * ema[-1] + (1 - smooth) * v)
        ema = np.array(ema[1:]) / (1 - smooth ** np.arange(1, len(pts) + 1))  # debiased: no pull towards 0 at the start
        lo, hi = pts[:, 1].min(), pts[:, 1].max()
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        text(f"{hi:.3g}", 4, top + 10), text(f"{lo:.3g}", 4, top + panel), text(f"smoothed, last: {ema[-1]:.3g}", width - right - 170, top - 7)
        for values, c, thick in ((pts[:, 1], tuple(int(c + (255 - c) * 0.7) for c in colour), 1), (ema, colour, 2)):
            xy = np.stack([xs(pts[:, 0]), top + panel - (values - lo) / (hi - lo) * panel], 1)
            cv2.polylines(img, [np.round(xy).astype(np.int32)], False, c, thick, cv2.LINE_AA)
    text("step", width - right - 30, img.shape[0] - 4)
    cv2.imwrite(path, img)


# ----------------------------------------------------------------------------- the training loop


def train(cfg):
    """Run one stage as configured; returns the last step's metrics. Writes everything under cfg.out."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.data:
        raise SystemExit("train.py: --data is required (or give no flags at all for the demo)")
    samples, bad_rows = D.read_samples(cfg.data, cfg.root or None, errors="skip")
    for msg in bad_rows:
        tqdm.write(f"skipping row: {msg}")
    if not samples:
        raise SystemExit(f"train.py: no usable samples in {cfg.data}")

    resume_from = find_checkpoint(cfg.out) if cfg.resume else None
    if resume_from:
        model = M.TinyLLaVA.from_pretrained(resume_from, device=device, dtype=torch.float32)
        tok, tok_file = D.Tokenizer(resume_from), tokenizer_file(resume_from)
    else:
        model, tok = load_model(cfg, device)
        tok_file = tokenizer_file(cfg.init or cfg.llm)
    freeze_vision(model)
    model.language_model.model.gradient_checkpointing = cfg.grad_checkpointing and device.type == "cuda"

    ref = None
    if cfg.stage == "grpo" and cfg.beta > 0:
        if resume_from:  # the reference is the start model, not the resumed one
            ref = M.TinyLLaVA.from_pretrained(cfg.init or os.path.join(cfg.out, "reference"), device=device, dtype=torch.float32)
            ref.vision_tower = model.vision_tower
            ref.requires_grad_(False).eval()
        else:
            ref = make_reference(model)
            if not cfg.init:  # a fresh connector: keep the reference to resume against it
                ref.save_pretrained(os.path.join(cfg.out, "reference"))
        if device.type == "cuda":
            ref.connector.to(torch.bfloat16), ref.language_model.to(torch.bfloat16)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    total = cfg.steps or max(1, int(cfg.epochs * max(1, len(samples) // cfg.prompts_per_step)))
    schedule = make_schedule(optimizer, cfg, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    load = VideoLoader(cfg.frames, model.config.vision.image_size)
    start, nan_steps = 0, 0
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, nan_steps, load.skipped = state["step"], state["nan_steps"], state["skipped"]
        records = read_jsonl(metrics_path, upto=start)  # drop what was logged after the checkpoint
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        tqdm.write(f"resuming {cfg.out} at step {start} of {total}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    records = read_jsonl(metrics_path)

    def apply_update():
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save(step):
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                 "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "nan_steps": nan_steps,
                 "skipped": load.skipped, "config": asdict(cfg)}
        write_checkpoint(model, tok_file, state, cfg.out)

    curve_keys = ["loss"] if cfg.stage == "sft" else ["reward", "accuracy", "format", "kl", "completion_length"]
    bar = tqdm(range(start, total), initial=start, total=total, desc=cfg.stage, dynamic_ncols=True)
    record = {}
    for step in bar:
        batch = step_samples(samples, step, cfg)
        if cfg.stage == "sft":
            m = sft_step(model, tok, batch, load, cfg, device)
        else:
            m = grpo_step(model, ref, tok, batch, load, cfg, device, gen, apply_update)
        if m.get("nan"):
            nan_steps += 1
            tqdm.write(f"step {step + 1}: non-finite loss, update skipped ({nan_steps} so far)")
            optimizer.zero_grad(set_to_none=True)
        elif not m.get("skipped_step"):
            apply_update()
        schedule.step()
        record = {"step": step + 1, "lr": schedule.get_last_lr()[0], **m, "skipped_samples": len(load.skipped),
                  "skipped_rows": len(bad_rows), "nan_steps": nan_steps}
        append_jsonl(metrics_path, record)
        records.append(record)
        plot_curves(records, os.path.join(cfg.out, "curves.png"), curve_keys)
        shown = ("loss",) if cfg.stage == "sft" else ("reward", "accuracy", "kl", "completion_length")
        bar.set_postfix({k: f"{m[k]:.3g}" for k in shown if isinstance(m.get(k), float)})
        last = step + 1 == total or (cfg.stop_after and step + 1 >= cfg.stop_after)
        if last or (step + 1) % cfg.save_every == 0:
            save(step + 1)
        if last:
            break
    if load.skipped:
        tqdm.write(f"{len(load.skipped)} samples skipped: unreadable videos (see metrics.jsonl 'skipped_samples')")
    return record


# ----------------------------------------------------------------------------- the CPU demo
# `python train.py` with no flags: the whole method on synthetic videos, small enough for a laptop CPU.
# A ~1M-parameter model learns from scratch to answer four kinds of questions about 8-frame clips
# (colour, direction of motion, which colour came first, how many flashes): a short cold start on a few
# reasoning answers, then GRPO on many questions with only the reward to learn from.


def demo_config(vocab_size):
    frames = DEMO["frames"]
    return M.TinyLLaVAConfig(
        # 32x32 frames in 8x8 patches: 4x4 a frame, the corner one dropped as published, 15 kept
        vision=M.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8),
        # the published connector: one group per frame, each frame's 15 tokens squeezed into 4 latents (32 video tokens)
        connector=M.ConnectorConfig(connector_type="groupresampler", num_queries=4 * frames, group=frames, num_resampler_layers=1,
                                    vision_hidden_size=64, hidden_size=128, heads=8, dim_head=16, ff_mult=2),
        text=M.TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
        raw={"num_frames": frames})


DEMO = dict(frames=8, n_train=2000, n_coldstart=64, n_test=200, n_captions=4000,
            base=dict(lr=1e-3, epochs=1, prompts_per_step=16, micro_batch=16),
            sft=dict(lr=1e-3, epochs=12, prompts_per_step=8, micro_batch=8),
            grpo=dict(lr=2e-4, steps=450, prompts_per_step=8, micro_batch=8, group_size=8, max_new_tokens=40, beta=0.01))


def demo(out, seed, device=""):
    t0 = time.time()
    paths = D.make_synthetic(os.path.join(out, "data"), n_train=DEMO["n_train"], n_coldstart=DEMO["n_coldstart"],
                             n_test=DEMO["n_test"], n_captions=DEMO["n_captions"], seed=seed)
    tok = D.synthetic_tokenizer(paths)
    tok_path = os.path.join(paths["root"], "tokenizer.json")
    init = os.path.join(out, "init")
    torch.manual_seed(seed)
    model = M.TinyLLaVA(demo_config(tok.vocab_size))
    model.save_pretrained(init)
    shutil.copy(tok_path, os.path.join(init, "tokenizer.json"))
    common = dict(seed=seed, frames=DEMO["frames"], device=device, save_every=10**9)
    # The published chain starts from a base model that already sees; here a short supervised stage on
    # plain descriptions of separate videos plays that part (on the GRPO videos themselves it would
    # memorise their answers). Then the paper's two stages.
    train(TrainConfig(stage="sft", init=init, data=paths["captions"], out=os.path.join(out, "base"), **common, **DEMO["base"]))
    train(TrainConfig(stage="sft", init=os.path.join(out, "base", "checkpoint"), data=paths["coldstart"],
                      out=os.path.join(out, "sft"), **common, **DEMO["sft"]))
    train(TrainConfig(stage="grpo", init=os.path.join(out, "sft", "checkpoint"), data=paths["grpo"],
                      out=os.path.join(out, "grpo"), **common, **DEMO["grpo"]))

    import sample  # evaluation lives with inference
    test = D.read_samples(paths["heldout"])[0]  # held-out questions, asked exactly as in training
    results = {}
    for stage in ("sft", "grpo"):
        model, tok = sample.load(os.path.join(out, stage, "checkpoint"), device or None)
        results[stage] = sample.evaluate(model, tok, test, "reason", batch_size=50, frames=DEMO["frames"], max_new_tokens=DEMO["grpo"]["max_new_tokens"])
    tasks = sorted({r["task"] for r in results["sft"]["records"]})
    per_task = {stage: {t: round(float(np.mean([r["correct"] for r in results[stage]["records"] if r["task"] == t])), 3)
                        for t in tasks} for stage in ("sft", "grpo")}
    print(f"\n{'held-out accuracy':<20}" + "".join(f"{t:>10}" for t in tasks) + f"{'all':>10}")
    for stage in ("sft", "grpo"):
        print(f"{stage:<20}" + "".join(f"{per_task[stage][t]:>10.3f}" for t in tasks) + f"{results[stage]['accuracy']:>10.3f}")
    # one held-out question, the first on which the two models answer differently (else the first)
    pairs = list(zip(results["sft"]["records"], results["grpo"]["records"]))
    a, b = next(((a, b) for a, b in pairs if a["output"] != b["output"]), pairs[0])
    question = {s.video: s.question for s in test}[a["video"]].replace(D.GRPO_SUFFIX, "")
    print(f"\none held-out question ({a['video']}):\n{question}"
          f"\n  right answer: {a['answer']}\n  cold start: {a['output'].strip()}\n  GRPO:       {b['output'].strip()}\n")
    summary = {"sft_accuracy": results["sft"]["accuracy"], "grpo_accuracy": results["grpo"]["accuracy"], "per_task": per_task,
               "sft_unparsed": results["sft"]["unparsed"], "grpo_unparsed": results["grpo"]["unparsed"],
               "n_test": len(test), "seed": seed, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Cold-start SFT and GRPO for TinyLLaVA-Video. With no --data: the CPU demo "
                                "(synthetic videos, a small model, SFT then GRPO, then both evaluated).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name), help=HELP[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            default = {"lr": 0.0, "schedule": ""}.get(f.name, getattr(defaults, f.name))
            p.add_argument(flag, type=typ, default=default, help=HELP[f.name])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.data:
        return demo(args.out, args.seed, args.device)
    try:
        cfg = TrainConfig(**vars(args))
    except ValueError as e:
        raise SystemExit(f"train.py: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
