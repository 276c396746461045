"""train.py's variant flags, each run through train.train for a step or two on test_train.py's tiny task and
checked against a hand computation (--scale, --loss-type, --mask-truncated, --skip-zero-variance, --temporal,
--updates-per-rollout) or against another run (training from parts, and its resume)."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import grpo as G
import model as M
import weights as W
import train
from test_train import run, task, weights  # noqa: F401 (task is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
P, GS, MAX_NEW = 2, 3, 6  # prompts per step, group size, longest completion
LENGTHS = [6, 2, 4, 3, 6, 1]  # completion lengths: rows 0 and 4 hit the limit (truncated)
REWARDS = [1.0, 1.0, 1.0, 0.0, 1.0, 3.0]  # the first group's all equal: zero variance


def injected_rollout(self, input_ids, video_features, eos_id, pad_id, group_size, max_new_tokens, **kw):
    """Completions of the LENGTHS above (random tokens, seeded), under the sampler's log-probs 0."""
    n = len(input_ids) * group_size
    ids = torch.randint(3, self.model.config.text.vocab_size, (n, max_new_tokens), generator=torch.Generator().manual_seed(n))
    lengths = torch.tensor(LENGTHS[:n])
    mask = (torch.arange(max_new_tokens)[None] < lengths[:, None]).float()
    return G.Rollout(ids.masked_fill(mask == 0, pad_id), mask, torch.zeros_like(mask), lengths == max_new_tokens, group_size)


@pytest.fixture
def spy(monkeypatch):
    """Records what one step learns from (train.update's Experience) and every grpo_loss call."""
    seen = {"exp": [], "loss": [], "steps": 0}
    real_update, real_loss, real_step = train.update, G.grpo_loss, train.optimizer_step

    def update(model, exp, *a, **k):
        seen["exp"].append(exp)
        return real_update(model, exp, *a, **k)

    def grpo_loss(logp, old, ref, adv, mask, **k):
        out = real_loss(logp, old, ref, adv, mask, **k)
        seen["loss"].append(dict(logp=logp.detach().clone(), old=old, adv=adv, mask=mask, metrics=out[1], **k))
        return out

    def optimizer_step(*a, **k):
        seen["steps"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(train, "update", update)
    monkeypatch.setattr(G, "grpo_loss", grpo_loss)
    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    return seen


def scripted_rewards(monkeypatch, *accuracies):
    """G.score with the rewards (and accuracies) given per call, in order: REWARDS if none."""
    real, calls = G.score, []

    def score(texts, solutions, reward_fns=None):
        out = real(texts, solutions)
        if accuracies:
            out["accuracy"] = torch.tensor(accuracies[len(calls)])
            out["reward"] = out["accuracy"].clone()
        else:
            out["reward"] = torch.tensor(REWARDS[:len(texts)])
        calls.append(texts)
        return out

    monkeypatch.setattr(G, "score", score)
    return calls


def flags_run(task, out, **kw):
    base = dict(steps=1, prompts_per_step=P, micro_batch=P, group_size=GS, max_new_tokens=MAX_NEW, noise_std=0.0, beta=0.0,
                compile=False)
    return run(task, out, **{**base, **kw})


@pytest.mark.parametrize("scale,loss_type,mask_truncated,skip_zero_variance", [
    ("group", "grpo", False, False), ("batch", "bnpo", False, False), ("none", "dr_grpo", False, False),
    ("group", "dapo", True, False), ("group", "grpo", False, True), ("batch", "bnpo", True, True)])
def test_scale_loss_type_and_masking_flags_by_hand(task, tmp_path, monkeypatch, spy, scale, loss_type, mask_truncated,
                                                   skip_zero_variance):
    """One step on injected completions and rewards, beta 0 and one update (ratio 1): every valid token's loss is
    -A of its row, so the step's loss is a weighted mean of the advantages, the weights set by --loss-type and the
    masks; the advantages are the rewards centred per group and scaled as --scale says."""
    monkeypatch.setattr(G.Sampler, "rollout", injected_rollout)
    scripted_rewards(monkeypatch)
    m = flags_run(task, tmp_path / "run", scale=scale, loss_type=loss_type, mask_truncated=mask_truncated,
                  skip_zero_variance=skip_zero_variance)
    r = torch.tensor(REWARDS).view(P, GS)
    centred = r - r.mean(1, keepdim=True)
    A = {"group": centred / (r.std(1, keepdim=True) + 1e-4), "batch": centred / (r.std() + 1e-4), "none": centred}[scale].flatten()
    exp = spy["exp"][0]
    assert torch.allclose(exp.advantages, A, atol=1e-6)
    n = torch.tensor(LENGTHS, dtype=torch.float)  # valid tokens per row
    if mask_truncated:
        n = n * torch.tensor([L < MAX_NEW for L in LENGTHS])
    if skip_zero_variance:
        n = n * torch.tensor([0.0] * GS + [1.0] * GS)
        assert exp.loss_mask[:GS].sum() == 0 and torch.equal(exp.loss_mask[GS:], exp.rollout.mask[GS:])
    want = {"grpo": -(A * (n > 0)).mean(), "bnpo": -(A * n).sum() / n.sum(), "dapo": -(A * n).sum() / n.sum(),
            "dr_grpo": -(A * n).sum() / (P * GS * MAX_NEW)}[loss_type]
    assert m["loss"] == pytest.approx(float(want), abs=1e-5)
    assert m["loss"] != pytest.approx(float(-(A * (n > 0)).mean() if loss_type != "grpo" else -(A * n).sum() / n.sum()), abs=1e-3)


def test_temporal_adds_the_bonus_from_a_rollout_on_shuffled_frames(task, tmp_path, monkeypatch, spy):
    """--temporal: each step's prompts are asked again on shuffled frames (same prompts, other features); a prompt
    whose ordered accuracy beats 0.8 x its shuffled one earns +0.3 on its correct completions (prompt 1 here:
    2/3 > 0; prompt 2: 0 < 1)."""
    features = []

    def rollout(self, input_ids, video_features, *a, **k):
        features.append(video_features.clone())
        return injected_rollout(self, input_ids, video_features, *a, **k)

    monkeypatch.setattr(G.Sampler, "rollout", rollout)
    calls = scripted_rewards(monkeypatch, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    flags_run(task, tmp_path / "run", temporal=True)
    assert len(calls) == 2 and len(features) == 2
    ordered, shuffled = features
    assert not torch.equal(ordered, shuffled)  # the frames were shuffled...
    assert torch.allclose(ordered.flatten().sort().values, shuffled.flatten().sort().values)  # ...not changed
    assert spy["exp"][0].scores["reward"].tolist() == pytest.approx([1.3, 1.3, 0.0, 0.0, 0.0, 0.0])
    calls.clear(), features.clear()
    scripted_rewards(monkeypatch, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    flags_run(task, tmp_path / "plain")
    assert len(features) == 1 and spy["exp"][1].scores["reward"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def clipped_loss_by_hand(call, eps=0.2):
    """The mean over rows of each row's mean over its tokens of -min(ratio A, clip(ratio) A); the clipped share."""
    ratio, A, mask = torch.exp(call["logp"] - call["old"]), call["adv"][:, None], call["mask"]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    clipped = ((ratio < 1 - eps) & (A < 0)) | ((ratio > 1 + eps) & (A > 0))
    return float(loss), float((clipped.float() * mask).sum() / mask.sum())


def test_updates_per_rollout_use_the_samplers_log_probs_and_clip(task, tmp_path, monkeypatch, spy):
    """--updates-per-rollout 2: two optimizer steps on one rollout. Both passes compare the policy with the
    sampler's log-probs of the rollout (equal to the policy's in the first pass, before any update), the second
    after an optimizer step has moved the policy, so its ratios leave [0.8, 1.2] and are clipped."""
    scripted_rewards(monkeypatch)  # rewards that differ within the second group
    m = flags_run(task, tmp_path / "run", updates_per_rollout=2, lr=3e-2, temperature=1.0, max_grad_norm=0.0)
    first, second = spy["loss"]
    assert spy["steps"] == 2  # one between the passes, one after
    exp = spy["exp"][0]
    T = first["logp"].shape[1]
    assert first["old"] is not None and torch.equal(first["old"], exp.rollout.logprobs[:, :T])
    valid = first["mask"] > 0
    assert (first["logp"] - first["old"])[valid].abs().max() <= 1e-4  # the sampler is the policy before the update
    assert torch.equal(second["old"], first["old"]) and (second["logp"] - first["logp"])[valid].abs().max() > 0.3
    for call in (first, second):
        loss, clip = clipped_loss_by_hand(call)
        assert call["metrics"]["loss"] == pytest.approx(loss, abs=1e-5) and call["metrics"]["clip_ratio"] == pytest.approx(clip)
    assert first["metrics"]["clip_ratio"] == 0 and second["metrics"]["clip_ratio"] > 0
    assert m["clip_ratio"] == pytest.approx((first["metrics"]["clip_ratio"] + second["metrics"]["clip_ratio"]) / 2)


# ----------------------------------------------------------------------------- from parts (--vision, --llm)


def write_parts(task, root):
    """The task's tiny model split into a SigLIP directory and a Qwen2 directory (their own layouts)."""
    model = W.from_pretrained(task["init"], dtype=torch.float32)
    vision, llm = root / "siglip", root / "qwen2"
    vision.mkdir(), llm.mkdir()
    save_file({"vision_model." + k: v.contiguous() for k, v in model.vision_tower.state_dict().items()},
              str(vision / "model.safetensors"))
    (vision / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": dataclasses.asdict(model.config.vision)}))
    save_file({k: v.contiguous() for k, v in model.language_model.state_dict().items()}, str(llm / "model.safetensors"))
    (llm / "config.json").write_text(json.dumps({**dataclasses.asdict(model.config.text), "model_type": "qwen2",
                                                 "torch_dtype": "float32"}))
    shutil.copy(os.path.join(task["init"], "tokenizer.json"), llm / "tokenizer.json")
    return str(vision), str(llm)


@pytest.mark.slow  # five short runs
def test_training_from_parts_equals_training_from_its_start_and_resumes_against_it(task, tmp_path):
    """A run from --vision/--llm starts from the parts and a fresh connector, kept in OUT/reference: it trains as a
    run from a copy of that start model does, and stopped and resumed it ends where the straight run ends
    (the KL is to the start model, not to the resumed weights)."""
    vision, llm = write_parts(task, tmp_path)
    parts = dict(init="", vision=vision, llm=llm, connector="groupresampler")
    kw = dict(steps=3, beta=0.5, compile=False, lr=1e-2)
    run(task, tmp_path / "parts", **parts, **kw)
    start = weights(tmp_path / "parts" / "reference")
    init = weights(task["init"])
    assert all(torch.equal(start[k], init[k]) for k in init if not k.startswith("connector"))  # the parts, as they were
    shutil.copytree(tmp_path / "parts" / "reference", tmp_path / "start")
    shutil.copy(os.path.join(llm, "tokenizer.json"), tmp_path / "start")
    run(task, tmp_path / "init", init=str(tmp_path / "start"), **kw)
    a, b = weights(tmp_path / "parts" / "checkpoint"), weights(tmp_path / "init" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], start[k]) for k in a if k.startswith("connector"))  # the connector trained
    run(task, tmp_path / "split", **parts, **kw, stop_after=1)
    run(task, tmp_path / "split", **parts, **kw, resume=True)
    c = weights(tmp_path / "split" / "checkpoint")
    assert all(torch.equal(a[k], c[k]) for k in a)
