"""Cold-start SFT and GRPO for TinyLLaVA-Video, on a CPU, one GPU or several (torchrun).

The paper's recipe in two stages:
  1. cold start: supervised fine-tuning on a handful of reasoning answers (lr 1e-5, constant, 1 epoch, 4
     samples per optimizer step), so the model learns to think in <think> tags and answer in <answer> tags;
  2. GRPO (grpo.py): for each question sample G = 8 answers, reward them, and push the policy towards the
     better-than-average ones, with a KL leash to the frozen start model (per-token KL clamped to [-100, 100];
     lr 1e-6, cosine with 3% warmup, 8 prompts per optimizer step).

The vision tower is frozen in both stages: its features are computed once per video and shared by the
rollout, the reference and the policy passes. Weights stay in fp32 (the paper's lr 1e-6 is below bf16's
resolution), compute runs in bf16 on a GPU.

    python demo.py                                    # the CPU demo: synthetic videos, SFT, then GRPO
    python train.py --stage sft --init BASE_DIR --data nextqa-coldstart-16.json --out runs/sft
    python train.py --stage grpo --init runs/sft/checkpoint --data nextqa_0-30s.jsonl --root videos --out runs/grpo
    torchrun --nproc_per_node 8 train.py --stage grpo ...     # 8 GPUs: data parallel (+ --fsdp: sharded)
    python train.py --stage grpo --init CKPT --lora 16 --dry-run  # what one GPU will hold (docs/memory.md), then exit

Every step appends its metrics to OUT/metrics.jsonl and redraws OUT/curves.png; OUT/checkpoint holds
the latest weights (loadable by sample.py) with the optimizer, scheduler, RNG and data position (JSON and
safetensors: loading them runs no code), so `--resume` continues the run exactly, even after a kill -9 at
any moment. A run folder is never overwritten (--overwrite) nor resumed with other settings, and a run
whose loss or sampled logits stay non-finite stops, keeping the last finite checkpoint.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

import data
import grpo
import sample
from parallel import (average_gradients, dry_run, gather, on_rank0, reduce_metrics, setup_distributed, shard, show_plan,
                      teardown_distributed)
from runs import (RunError, SaveFailed, Stopped, append_jsonl, catch_stop_signals, check_room, checkpoint_bytes,
                  load_state, plot_curves, prepare_out, read_jsonl, releasing_locks, run_budget, stop_requested,
                  tokenizer_file, write_checkpoint)
from model import adapters_off, add_lora, merge_lora
from weights import CheckpointError, from_parts, from_pretrained, save_pretrained


# ----------------------------------------------------------------------------- configuration


def option(default, help, choices=None):
    """A TrainConfig field with its --help text (and allowed values) beside it."""
    return field(default=default, metadata={"help": help, "choices": choices})


# --help shows the flags in these groups, each opened by its field below (the fields keep this order)
GROUPS = {"stage": "the paper's recipe (its defaults)", "loss_type": "its variants", "out": "the run",
          "micro_batch": "scale", "lora": "LoRA and memory", "eval_data": "evaluation"}


@dataclass
class TrainConfig:
    """Every flag of train.py; the defaults are the paper's. Empty / 0 defaults are resolved per stage below."""
    stage: str = option("grpo", "sft (cold start on reasoning answers) or grpo", ("sft", "grpo"))
    init: str = option("", "TinyLLaVA checkpoint directory to start from (config.json, safetensors, tokenizer)")
    vision: str = option("", "or a SigLIP checkpoint directory (with --llm: start from parts, a fresh connector)")
    llm: str = option("", "... and a Qwen2 checkpoint directory (its tokenizer is used)")
    connector: str = option("groupresampler", "connector type when starting from parts",
                            ("groupresampler", "naiveresampler", "mlp2x_gelu"))
    data: str = option("", "training data: NextQA GRPO .jsonl or cold-start .json")
    root: str = option("", "directory the video paths are relative to (default: the data file's)")
    lr: float = option(0.0, "peak learning rate (0: the paper's, 1e-5 sft, 1e-6 grpo)")
    schedule: str = option("", "learning-rate schedule (default: constant for sft, cosine for grpo)", ("constant", "cosine"))
    warmup: float = option(0.03, "fraction of the steps spent in linear warmup (cosine)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    epochs: float = option(1.0, "passes over the data")
    prompts_per_step: int = option(0, "prompts (grpo) or samples (sft) per optimizer step (0: the paper's, 4 sft, 8 grpo)")
    group_size: int = option(8, "completions sampled per prompt (G)")
    max_new_tokens: int = option(512, "longest completion")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(50, "sample from the k most likely tokens (0: all)")
    top_p: float = option(1.0, "nucleus sampling threshold (1: off)")
    beta: float = option(0.01, "weight of the KL to the reference model (0: no reference)")
    kl_clamp: bool = option(True, "clamp the per-token KL to [-100, 100], as the original code does")
    noise_std: float = option(0.02, "std of the Gaussian noise added to the advantages")
    scale: str = option("group", "advantage scaling: group (paper), batch, none", ("group", "batch", "none"))
    frames: int = option(16, "frames sampled uniformly per video")
    max_len: int = option(3072, "truncate sequences (prompt + answer) to this many token ids")

    loss_type: str = option("grpo", "grpo (paper), bnpo, dr_grpo, dapo (TRL's names)", grpo.LOSS_TYPES)
    updates_per_rollout: int = option(1, "optimizer steps per batch of rollouts (>1 uses the clipped ratio)")
    epsilon_low: float = option(0.2, "lower clip range of the ratio")
    epsilon_high: float = option(0.2, "upper clip range of the ratio (0.28 in DAPO)")
    mask_truncated: bool = option(False, "leave completions that hit --max-new-tokens out of the loss")
    skip_zero_variance: bool = option(False, "leave groups whose rewards are all equal out of the loss")
    temporal: bool = option(False, "T-GRPO: +0.3 to correct answers when ordered frames beat shuffled ones")

    out: str = option("runs/demo", "run directory: metrics.jsonl, curves.png, checkpoint/")
    seed: int = option(0, "seed of the data order, the sampling and the advantage noise")
    steps: int = option(0, "optimizer steps (0: from --epochs)")
    stop_after: int = option(0, "stop after this many steps, keeping the schedule of --steps (resume later)")
    save_every: int = option(50, "write the checkpoint every N steps (and at the end)")
    resume: bool = option(False, "continue from OUT/checkpoint (same settings; --steps, --stop-after ... may change)")
    overwrite: bool = option(False, "start over in an OUT that already holds a run (its metrics and checkpoint go)")
    device: str = option("", "cuda, cpu, ... (default: cuda if available)")

    micro_batch: int = option(1, "prompts or samples per forward pass (gradients accumulate up to --prompts-per-step)")
    rollout_batch: int = option(0, "prompts whose G rollouts decode as one batch (0: all prompts of the step); "
                                   "a decode step reads the weights once for all its rows")
    compile: bool = option(True, "decode rollouts through torch.compile, and a CUDA graph on a GPU")
    fsdp: bool = option(False, "under torchrun: shard the trainable model, its gradients and AdamW state (FSDP2)")

    lora: int = option(0, "LoRA rank: adapters on the decoder's linear layers, its weights frozen (0: full fine-tune)")
    lora_alpha: float = option(0.0, "LoRA scale alpha / rank (0: 2 x rank, TinyLLaVA's LoRA recipe)")
    grad_checkpointing: bool = option(True, "recompute decoder layers in backward to save memory (GPU)")
    dry_run: bool = option(False, "print the GPU memory plan of these flags from --init's config.json alone, then exit")
    nproc: int = option(0, "processes the plan assumes (0: torchrun's WORLD_SIZE, else 1)")

    eval_data: str = option("", "held-out multiple-choice file scored as sample.py --eval does, at the end and every --eval-every")
    eval_every: int = option(0, "with --eval-data: score it every N optimizer steps (0: only at the end)")

    def __post_init__(self):
        self.lr = self.lr or (1e-5 if self.stage == "sft" else 1e-6)
        self.schedule = self.schedule or ("constant" if self.stage == "sft" else "cosine")
        # the original's cold start ran on 4 GPUs x 1 sample, without accumulation
        self.prompts_per_step = self.prompts_per_step or (4 if self.stage == "sft" else 8)
        self.lora_alpha = self.lora_alpha or 2.0 * self.lora


MAY_CHANGE_ON_RESUME = {"steps", "epochs", "stop_after", "save_every", "micro_batch", "device", "grad_checkpointing",
                        "root", "out", "resume", "overwrite", "dry_run", "nproc"}
MAX_NONFINITE_IN_A_ROW = 5


class Diverged(RuntimeError):
    """The loss or the sampled logits stayed non-finite: the run stops (exit code 1)."""


def check_config(cfg):
    """Every flag value that cannot work, named in one line, before any work starts."""
    c, v = cfg, lambda name: f"--{name.replace('_', '-')} {getattr(cfg, name)!r}"
    bad = [f"{v(n)}: must be >= 1" for n in ("prompts_per_step", "micro_batch", "max_new_tokens", "frames", "save_every",
                                            "max_len", "updates_per_rollout") if getattr(c, n) < 1]
    bad += [f"{v(n)}: must be >= 0" for n in ("steps", "stop_after", "rollout_batch", "top_k", "weight_decay", "max_grad_norm", "beta",
                                             "noise_std", "epsilon_low", "epsilon_high", "lora", "nproc", "eval_every") if getattr(c, n) < 0]
    bad += [f"{v(f.name)}: must be one of {', '.join(f.metadata['choices'])}" for f in fields(c)
            if f.metadata["choices"] and getattr(c, f.name) not in f.metadata["choices"]]
    bad += [msg for ok, msg in [
        (c.data or c.dry_run, "--data is required (the CPU demo: python demo.py [--seed N --out DIR])"),
        (not (c.init and (c.vision or c.llm)), "give --init, or --vision and --llm, not both"),
        (c.init or (c.vision and c.llm), "give --init DIR, or --vision DIR and --llm DIR"),
        (c.group_size >= 2 or c.stage == "sft", f"{v('group_size')}: must be >= 2 (a group compares its answers)"),
        (c.temperature > 0 or (c.stage == "sft" and c.temperature == 0), f"{v('temperature')}: must be > 0 (GRPO samples)"),
        (0 < c.top_p <= 1, f"{v('top_p')}: must be in (0, 1]"), (c.lr > 0, f"{v('lr')}: must be > 0"),
        (0 <= c.warmup <= 1, f"{v('warmup')}: must be in [0, 1]"), (c.epochs > 0, f"{v('epochs')}: must be > 0"),
        (not (c.resume and c.overwrite), "give --resume or --overwrite, not both"),
        (not c.root or os.path.isdir(c.root), f"{v('root')}: no such directory"),
        (not os.path.abspath(c.init or "-").startswith(os.path.abspath(os.path.join(c.out, "checkpoint"))),
         f"{v('init')}: inside the checkpoint this run replaces (start from a copy)")] if not ok]
    if bad:
        raise RunError("; ".join(bad))


# ----------------------------------------------------------------------------- model, data, optimizer


def load_model(cfg, device, path=None):
    """The policy and its tokenizer, from a checkpoint (`path`, else --init) or from parts, in fp32."""
    path = path or cfg.init
    model = (from_pretrained(path, device=device, dtype=torch.float32) if path else
             from_parts(cfg.vision, cfg.llm, connector=cfg.connector, device=device, dtype=torch.float32))
    return model, data.Tokenizer(path or cfg.llm, model.config.text.vocab_size)


def freeze_vision(model):
    model.vision_tower.requires_grad_(False).eval()


def setup_lora(model, cfg, device, state=None):
    """--lora: the decoder frozen (bf16 on a GPU, as is the vision tower) under adapters trained with the connector in
    fp32; a resumed run's adapters and connector come from its trainer state. -> the start connector, frozen."""
    model.language_model.to(low_precision(device)), model.vision_tower.to(low_precision(device))  # None: as they are
    start = copy.deepcopy(model.connector).requires_grad_(False).eval().to(low_precision(device))
    add_lora(model, cfg.lora, cfg.lora_alpha)
    if state is not None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if trained - set(state["lora"]):
            raise RunError(f"{cfg.out}/checkpoint: trainer_state lacks {sorted(trained - set(state['lora']))[0]}")
        model.load_state_dict({k: v.to(device) for k, v in state["lora"].items()}, strict=False)
    return start


def make_schedule(optimizer, cfg, total):
    """A linear warmup over the first --warmup of the steps (cosine only), then constant, or a cosine down to 0."""
    warm = max(1, round(cfg.warmup * total)) if cfg.schedule == "cosine" else 0
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    factor = lambda step: (step + 1) / warm if step < warm else cosine(step) if cfg.schedule == "cosine" else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # step: the optimizer steps finished


# ----------------------------------------------------------------------------- one optimizer step


def on_gpu(device):
    """The GPU layout: checkpointed layers, a compiled sampler replayed as CUDA graphs, fused AdamW, low precision
    (the tests emulate it on the CPU by replacing this function and torch.cuda's graph and stream calls)."""
    return device.type == "cuda"


def low_precision(device):
    """The dtype of the sampler, the reference and autocast: bf16 on a GPU that has it; None (fp32) otherwise."""
    return torch.bfloat16 if on_gpu(device) and torch.cuda.is_bf16_supported() else None


def autocast(device):
    """Low-precision compute over fp32 weights on a GPU; plain fp32 on the CPU or a GPU without bf16."""
    return torch.autocast(device.type, dtype=low_precision(device), enabled=low_precision(device) is not None)


def sft_step(model, tok, samples, load, cfg, device):
    """Cross-entropy on the answer tokens, accumulated over micro-batches. -> metrics."""
    freeze_vision(model.train())
    total_tokens, total_loss, n = 0, 0.0, 0
    for a in range(0, len(samples), cfg.micro_batch):
        batch, pixels = load(samples[a:a + cfg.micro_batch])
        if not batch:
            continue
        pairs = [tok.sft_ids(s.question, s.solution, cfg.max_len) for s in batch]
        ids, labels, mask = (t.to(device) for t in data.collate_sft(pairs, tok.pad_id))
        with torch.no_grad():
            feats = model.vision_features(pixels.to(device))
        with autocast(device):
            x, xmask = model.embed(ids, model.connect(feats), mask)  # (B, L-1+Q, d): the video replaced one id
            # The last L positions line up with ids and labels: position j after the placeholder is j + Q-1
            # in x, and everything up to the placeholder is prompt (label -100), so no label is moved.
            logits = model.language_model.logits(model.language_model.model(x, xmask)[:, -ids.shape[1]:])
        # mean over the answer tokens of each sample, then over samples (so long answers do not dominate)
        tok_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
        valid = (labels[:, 1:] != -100).float()
        per_sample = (tok_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
        loss = per_sample.sum() / len(samples)  # accumulated: the mean over all the step's samples
        if not torch.isfinite(loss):
            return {"nan": 1.0}
        loss.backward()
        total_loss += per_sample.sum().item()
        total_tokens += int(valid.sum())
        n += len(batch)
    return {"loss": total_loss / max(n, 1), "tokens": float(total_tokens), "samples": float(n)}


# ----------------------------------------------------------------------------- one GRPO step: collect, then update
# A step is two halves with an Experience between them: `collect` needs no gradient, `update` is the only part with one.
# bench.py times these two functions, so the speed it reports is the speed of a training run.


@dataclass
class Experience:
    """What one GRPO step learns from: P prompts x G completions, rows prompt-major."""
    prompt_ids: list  # P lists of token ids, each with one IMAGE_TOKEN_INDEX
    features: torch.Tensor  # (P, T*728, 1152) frozen vision features, computed once per video
    rollout: grpo.Rollout  # (P*G, T) completions, their mask and log-probs under the sampler
    advantages: torch.Tensor  # (P*G,)
    loss_mask: torch.Tensor  # (P*G, T) tokens in the loss (rollout.mask, less skipped groups)
    ref_logp: torch.Tensor  # (P*G, T) under the frozen reference, or None (beta 0)
    texts: list  # P*G decoded completions
    scores: dict  # name -> (P*G,) rewards, accuracy, format
    times: dict  # phase -> seconds

    def micro_batches(self, n, pad_id):
        """Slices of n prompts, each padded only as much as its own rows need (a single prompt has no padding,
        so the policy's attention runs unmasked): (ids, pmask, features, completions, their mask, rows, T)."""
        G = self.rollout.group_size
        for a in range(0, len(self.prompt_ids), n):
            ids, pmask = (t.to(self.features.device) for t in data.collate_prompts(self.prompt_ids[a:a + n], pad_id))
            rows = slice(a * G, (a + len(ids)) * G)
            T = int(self.rollout.mask[rows].sum(1).max())  # drop the columns every row has finished by
            yield (ids, pmask, self.features[a:a + n], self.rollout.completion_ids[rows, :T],
                   self.rollout.mask[rows, :T], rows, T)


def collect(sampler, ref, tok, samples, load, cfg, device, gen, reward_fns=None):
    """G completions per prompt from the sampler, their rewards, advantages and reference log-probs -> Experience, or
    None if no video of the step could be read. Prompts decode --rollout-batch at a time. reward_fns: grpo.score's."""
    G, times = cfg.group_size, {"rollout": 0.0, "reference": 0.0}
    decode_texts = lambda ro: [tok.decode(r[m > 0]) for r, m in zip(ro.completion_ids.cpu(), ro.mask.cpu())]
    # One seed per prompt, drawn for all the step's prompts: its samples do not depend on batching nor on lost videos.
    seeds = dict(zip(map(id, samples), torch.randint(0, 2**31, (len(samples),), generator=gen, device=gen.device).cpu()))
    samples, pixels = load(samples)
    seeds = [seeds[id(s)] for s in samples]
    if not samples:
        return None
    prompt_ids = [tok.prompt_ids(s.question, cfg.max_len) for s in samples]
    t = time.perf_counter()
    with torch.no_grad(), autocast(device):
        features = torch.cat([sampler.model.vision_features(pixels[i:i + 8].to(device)) for i in range(0, len(samples), 8)])
    kw = dict(pad_id=tok.pad_id, group_size=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
              top_k=cfg.top_k, top_p=cfg.top_p)
    rolls, shuffled = [], []
    P = cfg.rollout_batch or len(samples)
    for a in range(0, len(samples), P):
        ids, pmask = data.collate_prompts(prompt_ids[a:a + P], tok.pad_id)
        ids, pmask, seed = ids.to(device), pmask.to(device), torch.stack(seeds[a:a + P])
        rolls.append(sampler.rollout(ids, features[a:a + P], tok.eos_id, attention_mask=pmask, seeds=seed, **kw))
        if cfg.temporal:  # T-GRPO: the same prompts on shuffled frames; only their accuracy is used
            with torch.no_grad(), autocast(device):
                shuf = sampler.model.vision_features(grpo.shuffle_frames(pixels[a:a + P].to(device), generator=gen))
            shuffled.append(sampler.rollout(ids, shuf, tok.eos_id, attention_mask=pmask, seeds=seed + 1, **kw))
    ro = grpo.concat_rollouts(rolls)
    texts = decode_texts(ro)
    solutions = [s.solution for s in samples for _ in range(G)]
    scores = grpo.score(texts, solutions, reward_fns)
    if cfg.temporal:
        acc_s = grpo.score(decode_texts(grpo.concat_rollouts(shuffled)), solutions)["accuracy"]
        scores["reward"] = scores["reward"] + grpo.temporal_bonus(scores["accuracy"], acc_s, G)
    times["rollout"] = time.perf_counter() - t
    advantages = grpo.group_advantages(scores["reward"], G, cfg.noise_std, cfg.scale, generator=gen).to(device)
    loss_mask = ro.mask.clone()
    if cfg.skip_zero_variance:
        loss_mask[grpo.zero_variance_groups(scores["reward"], G).to(device)] = 0
    exp = Experience(prompt_ids, features, ro, advantages, loss_mask, None, texts, scores, times)
    if ref is not None and cfg.beta > 0:
        t = time.perf_counter()
        exp.ref_logp = torch.zeros_like(ro.logprobs)
        with torch.no_grad(), autocast(device), adapters_off(ref):  # LoRA: the reference is the base
            for ids, pmask, feats, comp, cmask, rows, T in exp.micro_batches(cfg.micro_batch, tok.pad_id):
                exp.ref_logp[rows, :T] = grpo.completion_logprobs(ref, ids, ref.connect(feats), comp, cmask, pmask, cfg.temperature).float()
        times["reference"] = time.perf_counter() - t
    return exp


def update(model, exp, cfg, pad_id, apply_update):
    """--updates-per-rollout passes over the experience, gradients accumulated over micro-batches of prompts, weighted so
    the loss is the mean over the step's prompts; `apply_update()` steps between passes (the caller takes the last)."""
    freeze_vision(model.train())
    losses, kls, clips = [], [], []
    for update in range(cfg.updates_per_rollout):
        for ids, pmask, feats, comp, cmask, rows, T in exp.micro_batches(cfg.micro_batch, pad_id):
            with autocast(exp.features.device):
                logp = grpo.completion_logprobs(model, ids, model.connect(feats), comp, cmask, pmask, cfg.temperature)
                old = exp.rollout.logprobs[rows, :T] if cfg.updates_per_rollout > 1 else None
                ref = None if exp.ref_logp is None else exp.ref_logp[rows, :T]
                loss, lm = grpo.grpo_loss(logp, old, ref, exp.advantages[rows], exp.loss_mask[rows, :T], beta=cfg.beta,
                                       loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                       truncated=exp.rollout.truncated[rows] if cfg.mask_truncated else None,
                                       max_completion_length=cfg.max_new_tokens, kl_clamp=100.0 if cfg.kl_clamp else None)
            if not torch.isfinite(loss):
                return {"nan": 1.0}
            (loss * len(ids) / len(exp.prompt_ids)).backward()
            losses.append(lm["loss"]), kls.append(lm["kl"]), clips.append(lm["clip_ratio"])
        if update + 1 < cfg.updates_per_rollout:
            apply_update()
    return {"loss": float(np.mean(losses)), "kl": float(np.mean(kls)), "clip_ratio": float(np.mean(clips))}


def optimizer_step(optimizer, params, sampler, max_grad_norm):
    """Clip, step, and refresh the sampler. -> False, and no update, when the gradient is not finite."""
    finite = not max_grad_norm or bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
    if finite:
        optimizer.step()
        sampler.refresh()  # the next rollout samples from the updated policy
    optimizer.zero_grad(set_to_none=True)
    return finite


def grpo_step(model, sampler, ref, tok, samples, load, cfg, device, gen, apply_update, reward_fns=None):
    """collect, then update. -> the step's metrics (the caller takes the last optimizer step)."""
    t0 = time.perf_counter()
    exp = collect(sampler, ref, tok, samples, load, cfg, device, gen, reward_fns)
    if exp is None:
        return {"skipped_step": 1.0}
    t = time.perf_counter()
    out = update(model, exp, cfg, tok.pad_id, apply_update)
    times = {**exp.times, "policy": time.perf_counter() - t, "step": time.perf_counter() - t0}
    metrics = grpo.step_metrics(exp.rollout, exp.texts, exp.scores, cfg.group_size, kl=out.get("kl"), times=times)
    metrics.update(loss=out.get("loss", float("nan")), clip_ratio=out.get("clip_ratio", 0.0), example=exp.texts[0])
    if out.get("nan"):
        metrics["nan"] = 1.0
    return metrics


# ----------------------------------------------------------------------------- the training loop


def evaluate_policy(sampler, tok, samples, cfg, rank, world):
    """--eval-data scored as sample.py --eval does (greedy, the sampler's decode: compiled on a GPU), each rank its
    share, a rollout's rows at a time. -> eval/accuracy, eval/format and, where rows carry a "fact", the reasoning's."""
    res = sample.evaluate(sampler.model.eval(), tok, samples[rank::world], "reason", batch_size=cfg.prompts_per_step * cfg.group_size,
                          frames=cfg.frames, max_new_tokens=cfg.max_new_tokens, progress=False, decode=sampler.decode)
    keys = {"accuracy": "correct", "reasoning_accuracy": "reasoning_right", "answer_agrees_with_reasoning": "reasoning_agrees"}
    mine = {k: [r[v] for r in res["records"] if v in r] for k, v in keys.items()}
    mine["format"] = [grpo.format_reward(r["output"]) > 0 for r in res["records"]]
    every = gather(mine, world)
    return {f"eval/{k}": float(np.mean(v)) for k in mine for v in [[x for m in every for x in m[k]]] if v}


class Run:
    """One stage's run on this rank: data, model, sampler, reference, optimizer and the counters a checkpoint keeps."""

    def __init__(self, cfg, reward_fns=None):
        check_config(cfg)
        self.cfg, self.reward_fns = cfg, reward_fns
        self.rank, self.world, self.device = setup_distributed(cfg)
        rank, world = self.rank, self.world
        self.share = cfg.prompts_per_step // world
        torch.manual_seed(cfg.seed)  # the same on every rank: a fresh connector starts the same everywhere
        self.samples, self.bad_rows = data.read_samples(cfg.data, cfg.root or None, errors="skip")
        for msg in self.bad_rows if rank == 0 else ():
            tqdm.write(f"skipping row: {msg}")
        if not self.samples:
            raise RunError(f"no usable samples in {cfg.data}")
        self.held_out = data.read_samples(cfg.eval_data)[0] if cfg.eval_data else []
        self.resume_from = on_rank0(lambda: prepare_out(cfg, MAY_CHANGE_ON_RESUME), rank, world)  # rank 0 locks, tidies
        state = load_state(self.resume_from) if self.resume_from else None
        if state and (state.get("world_size", 1), state.get("fsdp", False)) != (world, cfg.fsdp):
            was = f"{state.get('world_size', 1)} process(es){' with --fsdp' if state.get('fsdp') else ''}"
            raise RunError(f"{self.resume_from} was written by {was}; resume it the same way "
                           f"(this run: {world}{' with --fsdp' if cfg.fsdp else ''})")
        self.setup_model(state)
        self.setup_optimizer()
        self.start, self.nan_steps, self.nan_run = 0, 0, 0  # nan_run: non-finite steps in a row
        self.records, self.seconds = [], []  # seconds: wall time of each step this process ran
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if state:
            self.resume(state)
        elif os.path.exists(self.metrics_path) and rank == 0:  # --overwrite
            os.remove(self.metrics_path)

    def setup_model(self, state):
        """The policy, its sampler and the frozen reference."""
        cfg, device, rank = self.cfg, self.device, self.rank
        self.model, self.tok = load_model(cfg, device, None if cfg.lora else self.resume_from)  # LoRA: the base
        model = self.model
        self.tok_file = tokenizer_file(self.resume_from or cfg.init or cfg.llm)
        freeze_vision(model)
        model.language_model.model.gradient_checkpointing = cfg.grad_checkpointing and on_gpu(device)
        start_connector, self.ref = setup_lora(model, cfg, device, state) if cfg.lora else None, None
        # Rollouts sample from a bf16 copy on a GPU (--lora: the policy, its base already bf16), from the policy on a
        # CPU, from a whole copy under --fsdp (the policy is sharded). SFT decodes only to evaluate: no bf16 copy.
        if on_gpu(device) and not low_precision(device) and rank == 0:
            tqdm.write("this GPU has no bf16 (V100, T4 ...): the sampler, the reference and every pass run in fp32")
        is_grpo = cfg.stage == "grpo"
        decodes = is_grpo or bool(cfg.eval_data)  # --eval-data decodes in SFT too
        self.sampler = grpo.Sampler(model, low_precision(device) if is_grpo else None, compile=cfg.compile and decodes,
                                    own_copy=cfg.fsdp and decodes, cuda_graph=on_gpu(device))
        if not (is_grpo and cfg.beta > 0):
            return
        if cfg.lora:  # the sampler's decoder (no copy), run with its adapters off (collect), and the start connector
            self.ref = copy.copy(self.sampler.model)
            self.ref._modules = {**self.ref._modules, "connector": start_connector}
        elif self.resume_from:  # the reference is the start model, not the resumed one
            self.ref = from_pretrained(cfg.init or os.path.join(cfg.out, "reference"), device=device,
                                       dtype=torch.float32).requires_grad_(False)  # in eval mode
            self.ref.vision_tower = model.vision_tower
        else:
            self.ref = grpo.frozen_copy(model)
            if not cfg.init and rank == 0:  # a fresh connector: keep the reference to resume against it
                save_pretrained(self.ref, os.path.join(cfg.out, "reference"))
        if low_precision(device) and not cfg.lora:
            self.ref.connector.to(low_precision(device)), self.ref.language_model.to(low_precision(device))

    def setup_optimizer(self):
        """The memory plan and the disk check, then (the model sharded under --fsdp) AdamW and its schedule."""
        cfg, device, rank, world, model = self.cfg, self.device, self.rank, self.world, self.model
        self.planned = show_plan(cfg, model.config, world, rank)
        self.total = cfg.steps or max(1, int(cfg.epochs * max(1, len(self.samples) // cfg.prompts_per_step)))
        self.need = checkpoint_bytes(model, self.tok_file)
        fresh = not self.resume_from and self.total > cfg.save_every
        on_rank0(lambda: check_room(cfg.out, self.need, cfg.save_every, fresh), rank, world)
        if cfg.fsdp:
            shard(model, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=on_gpu(device) and not cfg.fsdp)
        self.schedule = make_schedule(self.optimizer, cfg, self.total)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * rank)  # each rank samples its own
        self.load = data.VideoLoader(cfg.frames, model.config.vision.image_size)

    def resume(self, state):
        """The optimizer, schedule, RNGs and counters of the checkpoint; metrics.jsonl cut back to its step."""
        if self.cfg.fsdp:  # saved whole (keyed by parameter name); each rank keeps its shard
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.rank] if self.world > 1 else state
        try:
            self.gen.set_state(mine["generator"])
        except RuntimeError:  # a CUDA generator's state does not fit a CPU one, nor back
            tqdm.write(f"resuming on {self.device}, the checkpoint's generator was another device's: sampling will not "
                       "repeat the draws the original run would have made")
        torch.set_rng_state(mine["torch_rng"])
        self.start, self.nan_steps, self.nan_run = state["step"], state["nan_steps"], state["nan_run"]
        self.load.skipped = mine["skipped"]
        if self.rank == 0:
            self.records = read_jsonl(self.metrics_path, upto=self.start)  # drop what was logged after the checkpoint
            with open(self.metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            tqdm.write(f"resuming {self.cfg.out} at step {self.start} of {self.total}")

    def apply_update(self):
        if self.world > 1 and not self.cfg.fsdp:
            average_gradients(self.params, self.world)
        return optimizer_step(self.optimizer, self.params, self.sampler, self.cfg.max_grad_norm)

    def step(self, step):
        """Optimizer step `step` on this rank's share, evaluation when due. -> its metrics, the same on every rank."""
        cfg, device, t = self.cfg, self.device, time.perf_counter()
        batch = data.step_samples(self.samples, step, cfg.prompts_per_step, cfg.seed)[self.rank * self.share:(self.rank + 1) * self.share]
        try:
            if cfg.stage == "sft":
                m = sft_step(self.model, self.tok, batch, self.load, cfg, device)
            else:
                m = grpo_step(self.model, self.sampler, self.ref, self.tok, batch, self.load, cfg, device, self.gen,
                              self.apply_update, self.reward_fns)
        except FloatingPointError:  # non-finite logits in a rollout
            m = {"nan": 1.0}
        m = reduce_metrics({**m, "skipped_samples": len(self.load.skipped)}, self.world)  # the same on every rank
        if not m.get("nan") and not m.get("skipped_step") and not self.apply_update():
            m["nan"] = 1.0  # a non-finite gradient
        self.nan_steps, self.nan_run = self.nan_steps + bool(m.get("nan")), (self.nan_run + 1) * bool(m.get("nan"))
        if m.get("nan"):
            if self.rank == 0:
                tqdm.write(f"step {step + 1}: non-finite loss, logits or gradient, update skipped "
                           f"({self.nan_steps} so far)")
            self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.held_out and (step + 1 == self.total or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            m.update(evaluate_policy(self.sampler, self.tok, self.held_out, cfg, self.rank, self.world))  # resumes too
        if on_gpu(device):
            m["peak_memory_gb"], m["planned_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9, self.planned / 1e9
        self.seconds.append(time.perf_counter() - t)
        return m

    def log(self, step, m, bar):
        """The step's record to metrics.jsonl, curves.png and the bar (the run's budget after step 3). -> the record"""
        if len(self.seconds) == 3 and step + 1 < self.total and self.rank == 0:
            tqdm.write(run_budget(self.seconds, self.records + [m], step + 1, self.total))
        record = {"step": step + 1, "lr": self.schedule.get_last_lr()[0], **m, "skipped_rows": len(self.bad_rows),
                  "nan_steps": self.nan_steps}
        curves = ["loss"] if self.cfg.stage == "sft" else ["reward", "accuracy", "format", "kl", "completion_length"]
        if self.rank == 0:
            append_jsonl(self.metrics_path, record)
            self.records.append(record)
            plot_curves(self.records, os.path.join(self.cfg.out, "curves.png"), curves + [k for k in (
                "eval/accuracy", "eval/reasoning_accuracy") if any(k in r for r in self.records)])
        bar.set_postfix({k: f"{m[k]:.3g}" for k in curves if k != "format" and isinstance(m.get(k), float)})
        return record

    def save(self, step):
        """OUT/checkpoint after `step` steps; every rank takes part: its RNG state, and its shards under --fsdp."""
        cfg, rank, world, model = self.cfg, self.rank, self.world, self.model
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        if not gather(bool(torch.stack([p.isfinite().all() for p in local]).all()), world) == [True] * world:
            raise Diverged(f"step {step}: the weights are non-finite, the run has diverged; {cfg.out}/checkpoint "
                           "keeps the last finite ones (start over with a lower --lr, --overwrite)")
        ranks = gather({"generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "skipped": self.load.skipped}, world)
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=whole) if cfg.fsdp else model.state_dict() if cfg.lora else None
        optim = get_optimizer_state_dict(model, self.optimizer, options=whole) if cfg.fsdp else self.optimizer.state_dict()
        if rank == 0 and cfg.lora:  # the checkpoint's weights merged; the adapters and the connector as trained, in the state
            trained = {n: weights[n] for n, p in model.named_parameters() if p.requires_grad}
            weights = merge_lora({k: v.cpu() for k, v in weights.items()}, cfg.lora_alpha / cfg.lora)  # fp32 off the GPU
        trainer_state = lambda: {"step": step, "optimizer": optim, "scheduler": self.schedule.state_dict(), **ranks[0],
                                 "skipped": [s for r in ranks for s in r["skipped"]], "nan_steps": self.nan_steps,
                                 "nan_run": self.nan_run, "config": asdict(cfg), "world_size": world, "fsdp": cfg.fsdp,
                                 **({"ranks": ranks} if world > 1 else {}), **({"lora": trained} if cfg.lora else {})}
        # no rank runs ahead of a checkpoint being written, nor on when it failed
        on_rank0(lambda: write_checkpoint(model, self.tok_file, trainer_state(), cfg.out, weights, self.need), rank,
                 world, SaveFailed)


@releasing_locks
def train(cfg, reward_fns=None):
    """Run one stage as configured, writing everything under cfg.out. -> the last step's metrics. reward_fns: extra GRPO
    rewards, name -> fn(completion, solution) (grpo.score). Raises RunError (or data.DataError, weights.CheckpointError)
    on bad input before any work, Diverged after MAX_NONFINITE_IN_A_ROW non-finite steps in a row."""
    run, record = Run(cfg, reward_fns), {}
    bar = tqdm(range(run.start, run.total), initial=run.start, total=run.total, desc=cfg.stage, dynamic_ncols=True,
               disable=run.rank > 0)
    for step in bar:
        record = run.log(step, run.step(step), bar)
        if run.nan_run >= MAX_NONFINITE_IN_A_ROW:
            raise Diverged(f"{run.nan_run} non-finite steps in a row (to step {step + 1}): the run has diverged; "
                           f"{cfg.out}/checkpoint keeps the last finite weights (start over with a lower --lr, --overwrite)")
        last = step + 1 == run.total or (cfg.stop_after and step + 1 >= cfg.stop_after)
        stop = next(filter(None, gather(stop_requested(), run.world)), None)  # a signal to any rank stops all here
        if last or stop or (step + 1) % cfg.save_every == 0:
            run.save(step + 1)
        if stop and not last:
            raise Stopped(stop, step + 1, os.path.join(cfg.out, "checkpoint"))
        if last:
            break
    if run.load.skipped and run.rank == 0:
        tqdm.write(f"{len(run.load.skipped)} samples skipped: unreadable videos (see metrics.jsonl 'skipped_samples')")
    return record


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Cold-start SFT and GRPO for TinyLLaVA-Video (the CPU demo: python demo.py).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: (print(f"train.py: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    for f in fields(TrainConfig):  # every field a flag, its help and choices from the field
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        group = p.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        how = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type, choices=meta["choices"])
        group.add_argument(flag, default=f.default, help=meta["help"], **how)
    return p.parse_args(argv), p


def main(argv=None):
    """-> exit code: 0 done, 1 diverged or a save failed, 2 bad flags, data, checkpoint or run folder (a folder in use),
    128 + the signal's number when SIGTERM or SIGINT stopped the run after saving it (143, 130); one line each."""
    args, _ = parse_args(argv)  # argv None: sys.argv's
    previous_handlers = catch_stop_signals()
    try:
        cfg = TrainConfig(**vars(args))
        if cfg.dry_run:
            check_config(cfg)
            return dry_run(cfg)
        train(cfg)
        return 0
    except (RunError, data.DataError, data.VideoError, CheckpointError, Diverged, SaveFailed, Stopped) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) else 1 if isinstance(e, (Diverged, SaveFailed)) else 2
    finally:
        catch_stop_signals(previous_handlers), teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
