"""Several processes, on PyTorch's own engine (torch.distributed; FSDP2 with --fsdp).

`torchrun --nproc_per_node N train.py ...` runs N ranks, one per GPU. Each takes its N-th of every step's prompts (whole
groups), rolls them out with its own generator and computes its loss, the mean over its own prompts; the gradients are
then averaged over the ranks (an all-reduce before the optimizer step, or FSDP2's reduce-scatter in backward with
--fsdp). The ranks hold equal shares, so the average is the mean over all the step's prompts: the single-process update.
Rank 0 alone writes metrics, curves and checkpoints. Every rank must run the same number of forward passes under --fsdp
(each layer gathers its shards collectively)."""

import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from model import TinyLLaVA, TinyLLaVAConfig, add_lora
from runs import RunError


def setup_distributed(cfg):
    """-> (rank, world, device), a CUDA device made the current one. Under torchrun (it sets WORLD_SIZE, RANK,
    LOCAL_RANK) join the process group: nccl with one GPU per rank, gloo on CPUs. Without torchrun: (0, 1, device)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # streams and CUDA graphs are made on the current device: make it this one
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if "WORLD_SIZE" in os.environ else device
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        if cfg.fsdp:
            raise RunError("--fsdp needs torchrun: torchrun --nproc_per_node N train.py --fsdp ...")
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if cfg.prompts_per_step % world:  # each rank takes an equal share of a step's prompts
        raise RunError(f"--prompts-per-step {cfg.prompts_per_step} does not split evenly over {world} processes")
    return dist.get_rank(), world, device


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model, device):
    """--fsdp: each decoder layer is one FSDP2 unit, the rest of the trainable model (connector,
    embeddings, final norm) the root unit; the frozen vision tower stays whole on every rank. On a
    GPU the gathered weights compute in bf16 and gradients are reduced in fp32."""
    mp = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.vision_tower.parameters()))
    register_fsdp_forward_method(model, "connect")  # the policy's passes enter through connect(), not forward()


def average_gradients(params, world):
    """Data parallel: every gradient summed over the ranks and divided by `world`, once per optimizer
    step after all micro-batches (DDP does this during backward, but only for passes through the
    model's forward(), which the policy's passes do not use). A rank with no gradient adds zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for p, work in zip(params, works):
        work.wait()
        p.grad.div_(world)


def gather(obj, world):
    """A small Python object from every rank -> the list of them, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, rank, world, errors=(RunError,)):
    """fn() on rank 0 alone (it locks, tidies and writes the run folder) -> its result on every rank, or the error of
    `errors` it raised, raised on every rank: no rank waits for one that has given up."""
    try:
        result, error = (fn() if rank == 0 else None), None
    except errors as e:
        result, error = None, e
    result, error = gather((result, error), world)[0]
    if error is not None:
        raise error
    return result


def reduce_metrics(m, world):
    """One step's metrics of every rank -> the step's (the same on every rank): sums for counts and throughput, min/max
    for extremes, the slowest rank's times, rank 0's example, means otherwise (the ranks hold equal shares). A
    non-finite loss on any rank skips the update on all; the step is skipped only if no rank had a readable video."""
    if world == 1:
        return m
    ms, out = gather(m, world), {}
    for k in dict.fromkeys(k for r in ms for k in r):
        vs = [r[k] for r in ms if k in r]
        how = (sum if k in ("tokens", "samples", "tokens_per_s", "skipped_samples") else min if k.endswith("_min")
               else max if k.endswith("_max") or k.startswith("time/") or k == "nan" else np.mean)
        out[k] = vs[0] if isinstance(vs[0], str) else float(how(vs))
    if sum("skipped_step" in r for r in ms) < world:
        out.pop("skipped_step", None)
    return out


# ----------------------------------------------------------------------------- the memory plan
# What one GPU holds for a run's flags, part by part, from the model's config alone (built on the meta device: no
# weights, no memory). Bytes: fp32 master weights, gradients and AdamW moments of what trains (split over the ranks
# with --fsdp), bf16 for what is frozen or only samples. The rollout's KV cache and the update's activations are never
# held at once: the total counts the larger.

PROMPT_TEXT_TOKENS = 128  # the question, its options and the template around the video tokens: an allowance
LOGIT_CHUNK = 64  # grpo.completion_logprobs' positions a chunk


def memory_plan(cfg, config, world):
    """-> {part: (bytes, what)} and the total bytes, for train.py's `cfg` on `world` processes at `config`'s shapes."""
    with torch.device("meta"):
        model = TinyLLaVA(config)
        if cfg.lora:
            add_lora(model, cfg.lora, cfg.lora_alpha)
    count = lambda m, grad=None: sum(p.numel() for p in m.parameters() if grad is None or p.requires_grad == grad)
    t, v, c, shards, grpo = config.text, config.vision, config.connector, world if cfg.fsdp else 1, cfg.stage == "grpo"
    decoder, connector = count(model.language_model), count(model.connector)
    trained = connector + (count(model.language_model, True) if cfg.lora else decoder)
    prompts = cfg.prompts_per_step // world  # this rank's share of a step
    vis_tokens = cfg.frames * ((v.image_size // v.patch_size) ** 2 - (config.vision_feature_select_strategy == "patch"))
    video = c.num_queries if c.connector_type != "mlp2x_gelu" else vis_tokens
    seq = min(video + PROMPT_TEXT_TOKENS + cfg.max_new_tokens, cfg.max_len)  # the longest prompt + completion
    rows, rb = cfg.micro_batch * (cfg.group_size if grpo else 1), 2 if cfg.lora else 4  # rb: the residual stream's bytes
    kv = 2 * t.num_key_value_heads * t.head_dim
    layer = 2 * (8 * t.hidden_size + 2 * kv + 4 * t.intermediate_size) + rb * 4 * t.hidden_size  # a token's, one layer
    acts = (t.num_hidden_layers * rb * t.hidden_size + 2 * layer if cfg.grad_checkpointing else t.num_hidden_layers * layer)
    own_sampler = grpo and (not cfg.lora or cfg.fsdp)
    decoding = min(cfg.rollout_batch or prompts, prompts) * cfg.group_size  # rows decoding together
    parts = {
        "weights": ((2 * count(model.language_model, False) + 4 * trained) / shards if cfg.lora else 4 * trained / shards,
                    "frozen decoder bf16, adapters and connector fp32" if cfg.lora else "fp32 master of connector + decoder"),
        "gradients": (4 * trained / shards, "fp32"), "optimizer": (8 * trained / shards, "AdamW moments, fp32"),
        "vision tower": ((2 if cfg.lora else 4) * count(model.vision_tower), "frozen"),
        "sampler": (2 * (decoder + connector) * own_sampler, "bf16 copy the rollouts decode" if own_sampler else "the policy itself"),
        "reference": (2 * (connector + (0 if cfg.lora else decoder)) * (grpo and cfg.beta > 0),
                      "the start connector; the decoder with adapters off" if cfg.lora else "bf16 copy"),
        "video features": (2 * prompts * vis_tokens * v.hidden_size, "the step's videos, bf16"),
        "rollout KV cache": (grpo * decoding * (2 * seq * t.num_hidden_layers * kv + 12 * t.vocab_size), f"bf16, {decoding} rows "
                             f"of {seq} positions, + logits"),
        "activations": (rows * seq * acts + 2 * cfg.micro_batch * vis_tokens * c.hidden_size * (2 + 6 * c.num_resampler_layers),
                        f"{rows} sequences" + (", checkpointed" if cfg.grad_checkpointing else "")),
        "logits chunks": (14 * rows * min(LOGIT_CHUNK, seq) * t.vocab_size, f"{LOGIT_CHUNK} positions x vocab, fp32"),
    }
    phases = [parts["rollout KV cache"][0], parts["activations"][0] + parts["logits chunks"][0]]
    return parts, sum(b for b, _ in parts.values()) - min(phases)


def show_plan(cfg, config, world, rank=0):
    """Rank 0 prints the plan as lines for a person, the last one JSON {"total_gb", "parts": {part: GB}}. -> total"""
    parts, total = memory_plan(cfg, config, world)
    how = f"{world} GPU{'s' * (world > 1)}" + (" --fsdp" if cfg.fsdp else " data parallel" if world > 1 else "")
    lora = f' --lora {cfg.lora}' if cfg.lora else ', full fine-tune'
    lines = [f"memory plan, one GPU of {how}, {cfg.stage}{lora} (estimate):"]
    lines += [f"  {k:<17}{b / 1e9:7.2f} GB  {what}" for k, (b, what) in parts.items()]
    lines.append(f"  {'total':<17}{total / 1e9:7.2f} GB  (KV cache or activations + logits: the larger)")
    lines.append(json.dumps({"total_gb": round(total / 1e9, 2), "parts": {k: round(b / 1e9, 3) for k, (b, _) in parts.items()}}))
    if rank == 0:
        print("\n".join(lines))
    return total


def dry_run(cfg):
    """--dry-run: the memory plan at --init's shapes, from its config.json alone (no weights, no data). -> 0"""
    if not cfg.init:
        raise RunError("--dry-run reads the model's shapes from --init DIR/config.json: give --init")
    try:
        with open(os.path.join(cfg.init, "config.json")) as f:
            config = TinyLLaVAConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise RunError(f"{cfg.init}/config.json: not a readable TinyLLaVA config ({type(e).__name__}: {e})") from None
    show_plan(cfg, config, cfg.nproc or int(os.environ.get("WORLD_SIZE", 1)))
    return 0
