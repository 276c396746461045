"""Several processes, on PyTorch's own engine (torch.distributed; FSDP2 with --fsdp).

`torchrun --nproc_per_node N train.py ...` runs N ranks, one per GPU. Each takes its N-th of every step's prompts (whole
groups), rolls them out with its own generator and computes its loss, the mean over its own prompts; the gradients are
then averaged over the ranks (an all-reduce before the optimizer step, or FSDP2's reduce-scatter in backward with
--fsdp). The ranks hold equal shares, so the average is the mean over all the step's prompts: the single-process update.
Rank 0 alone writes metrics, curves and checkpoints. Every rank must run the same number of forward passes under --fsdp
(each layer gathers its shards collectively)."""

import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from runs import RunError


def setup_distributed(cfg):
    """-> (rank, world, device). Under torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK) join the
    process group: nccl with one GPU per rank, gloo on CPUs. Without torchrun: (0, 1, device)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "WORLD_SIZE" not in os.environ:
        if cfg.fsdp:
            raise RunError("--fsdp needs torchrun: torchrun --nproc_per_node N train.py --fsdp ...")
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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
