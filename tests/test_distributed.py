"""train.py on 2 processes (gloo on CPU, tiny model): the same update as one process, and a torchrun
run that checkpoints and resumes. Ranks are started the way torchrun starts them (its environment)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo as G
import train
from test_train import task, weights  # noqa: F401  (the tiny model and synthetic task)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # starts processes: ~1 min


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, fn, args, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        fn(*args, **kw)
    finally:
        train.teardown_distributed()


def on_ranks(world, fn, *args, **kw):
    """fn(*args, **kw) in `world` fresh processes; raises if any of them fails."""
    mp.start_processes(_rank, args=(world, free_port(), fn, args, kw), nprocs=world, start_method="spawn")


def config(task, out, stage, **kw):
    base = dict(stage=stage, init=task["init"], data=task["grpo" if stage == "grpo" else "coldstart"], out=out, frames=4,
                lr=1e-3, prompts_per_step=4, micro_batch=1, group_size=3, max_new_tokens=6, steps=2, save_every=1, seed=0,
                compile=False)
    return train.TrainConfig(**{**base, **kw})


def max_diff(a, b):
    assert list(a) == list(b) if isinstance(a, dict) else len(a) == len(b)
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return max(float((x - y).abs().max()) for x, y in pairs)


# ----------------------------------------------------------------------------- SFT and GRPO: the same update
# GRPO's completions and rewards are injected: each prompt's completions depend only on its own
# tokens, so they are the same however the prompts are spread over ranks (sampling would differ:
# each rank has its own generator). The gradient is recorded where the optimizer step reads it.


def injected_rollout(self, input_ids, video_features, eos_id, pad_id, group_size, max_new_tokens, **kw):
    ids, lengths = [], []
    for row in input_ids.cpu():
        g = torch.Generator().manual_seed(int(row[(row >= 0) & (row != pad_id)].sum()))
        ids.append(torch.randint(3, self.model.config.text.vocab_size, (group_size, max_new_tokens), generator=g))
        lengths.append(torch.randint(1, max_new_tokens + 1, (group_size,), generator=g))
    ids, lengths = torch.cat(ids), torch.cat(lengths)
    mask = (torch.arange(max_new_tokens)[None] < lengths[:, None]).float()
    ids = ids.masked_fill(mask == 0, pad_id)
    dev = input_ids.device
    return G.Rollout(ids.to(dev), mask.to(dev), torch.zeros_like(mask, device=dev), (lengths == max_new_tokens).to(dev), group_size)


real_rollout = G.Sampler.rollout


def recording_gradients(out):
    """Patches train.optimizer_step: rank 0 saves the first step's averaged gradient to OUT/grad.pt. -> undo."""
    real_step = train.optimizer_step

    def step(optimizer, params, sampler, max_grad_norm):
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for p in params]
        path = os.path.join(out, "grad.pt")
        if (not dist.is_initialized() or dist.get_rank() == 0) and not os.path.exists(path):
            torch.save(grads, path)
        return real_step(optimizer, params, sampler, max_grad_norm)

    train.optimizer_step = step
    return lambda: setattr(train, "optimizer_step", real_step)


def grpo_gradient(task, out, **kw):
    """One GRPO step on injected completions; rank 0 saves the averaged gradient to OUT/grad.pt."""
    real_score = G.score

    def score(texts, solutions, reward_fns=None):  # rewards that differ within a group, from the text alone
        return {**real_score(texts, solutions), "reward": torch.tensor([float(len(t) % 5) for t in texts])}

    G.Sampler.rollout, G.score, undo = injected_rollout, score, recording_gradients(out)
    try:
        train.train(config(task, out, "grpo", steps=1, noise_std=0.0, **kw))
    finally:
        G.Sampler.rollout, G.score = real_rollout, real_score
        undo()


def sft(task, out, **kw):
    """Two SFT steps; rank 0 saves the first one's averaged gradient to OUT/grad.pt."""
    undo = recording_gradients(out)
    try:
        train.train(config(task, out, "sft", micro_batch=2, **kw))
    finally:
        undo()


def every_case(task, root):
    """What the tests below compare, in one launch of 2 ranks (starting processes is the slow part)."""
    for fsdp in (False, True):
        sft(task, os.path.join(root, f"sft-{fsdp}"), fsdp=fsdp)
        grpo_gradient(task, os.path.join(root, f"grpo-{fsdp}"), fsdp=fsdp)
        grpo_gradient(task, os.path.join(root, f"grpo-lora-{fsdp}"), fsdp=fsdp, lora=2)
        for lora in (0, 2) if fsdp else (0,):  # LoRA's own save and load under FSDP (without: test_lora.py)
            for name, kw in (("straight", {}), ("split", dict(stop_after=1)), ("split", dict(resume=True))):
                train.train(config(task, os.path.join(root, f"resume-{fsdp}-{lora}-{name}"), "grpo", fsdp=fsdp, lora=lora, **kw))
    try:
        sft(task, os.path.join(root, "uneven"), prompts_per_step=3)
    except train.RunError as e:
        open(os.path.join(root, "uneven.txt"), "w").write(str(e))


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sft(task, str(root / "sft-one"))
    grpo_gradient(task, str(root / "grpo-one"))
    grpo_gradient(task, str(root / "grpo-lora-one"), lora=2)
    on_ranks(2, every_case, task, str(root))
    return root


@pytest.mark.parametrize("fsdp", [False, True])
def test_sft_on_two_ranks_equals_one_process(task, runs, fsdp):
    """The gradient, not only the weights: after fresh AdamW steps every weight moves by about lr whatever the
    gradient's size (a gradient twice too large moves it the same)."""
    one, two = (torch.load(runs / d / "grad.pt", weights_only=True) for d in ("sft-one", f"sft-{fsdp}"))
    scale = max(float(g.abs().max()) for g in one)
    assert scale > 1e-4 and max_diff(one, two) <= 1e-5 * scale
    one, two = weights(runs / "sft-one" / "checkpoint"), weights(runs / f"sft-{fsdp}" / "checkpoint")
    assert max_diff(one, weights(task["init"])) > 1e-3  # it trained
    assert max_diff(one, two) <= 1e-5
    rows = [json.loads(line) for line in open(runs / f"sft-{fsdp}" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples"] == 4 for r in rows)  # summed over ranks


@pytest.mark.parametrize("fsdp", [False, True])
@pytest.mark.parametrize("lora", ["", "lora-"])
def test_grpo_gradient_on_two_ranks_equals_one_process(runs, fsdp, lora):  # LoRA: the adapters' and the connector's
    one, two = (torch.load(runs / d / "grad.pt", weights_only=True) for d in (f"grpo-{lora}one", f"grpo-{lora}{fsdp}"))
    scale = max(float(g.abs().max()) for g in one)
    assert scale > 1e-4  # the injected rewards do give a gradient
    assert max_diff(one, two) <= 1e-5 * scale


@pytest.mark.parametrize("fsdp, lora", [(False, 0), (True, 0), (True, 2)])
def test_two_ranks_resume_exactly(runs, fsdp, lora):  # each rank's generator, and under FSDP the gathered AdamW state
    straight, split = (runs / f"resume-{fsdp}-{lora}-{name}" for name in ("straight", "split"))
    assert max_diff(weights(straight / "checkpoint"), weights(split / "checkpoint")) == 0
    rows = [json.loads(line) for line in open(split / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


def test_prompts_must_split_evenly(runs):
    assert "--prompts-per-step 3 does not split evenly over 2 processes" in (runs / "uneven.txt").read_text()


# ----------------------------------------------------------------------------- torchrun end to end


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "train.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_torchrun_grpo_checkpoints_and_resumes(task, tmp_path):
    out = str(tmp_path / "run")
    common = ["--stage", "grpo", "--init", task["init"], "--data", task["grpo"], "--out", out, "--frames", "4",
              "--prompts-per-step", "4", "--group-size", "3", "--max-new-tokens", "6", "--steps", "2", "--no-compile"]
    r = torchrun(*common, "--stop-after", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == [".lock", "checkpoint", "curves.png", "metrics.jsonl"]
    state = train.load_state(os.path.join(out, "checkpoint"))
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["step"] == 1
    assert not torch.equal(state["ranks"][0]["generator"], state["ranks"][1]["generator"])

    with pytest.raises(train.RunError, match="written by 2 process"):  # one process cannot resume it
        train.train(config(task, out, "grpo", resume=True, lr=1e-6))
    r = torchrun(*common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert train.load_state(os.path.join(out, "checkpoint"))["step"] == 2
