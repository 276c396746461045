"""train.py and sample.py end to end on a tiny model and a tiny synthetic task (CPU, seconds)."""

import json
import math
import os
import shutil

import pytest
import torch

import data as D
import demo
import model as M
import sample
import train
import weights as W


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Synthetic videos, a tokenizer, and a tiny model saved as a checkpoint to start from."""
    root = tmp_path_factory.mktemp("task")
    paths = demo.make_synthetic(str(root / "data"), n_train=16, n_coldstart=8, n_test=8, seed=0)
    texts = [s.question + " " + s.solution for f in (paths["coldstart"], paths["grpo"]) for s in D.read_samples(f)[0]]
    tok = D.train_tokenizer([D.build_prompt(t) for t in texts], str(root / "tokenizer.json"), vocab_size=300)
    torch.manual_seed(0)
    cfg = M.TinyLLaVAConfig(
        vision=M.VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8),
        connector=M.ConnectorConfig(num_queries=4, group=2, num_resampler_layers=1, vision_hidden_size=32, hidden_size=32, heads=2, dim_head=16),
        text=M.TextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        raw={"num_frames": 4})
    init = root / "init"
    W.save_pretrained(M.TinyLLaVA(cfg), str(init))
    shutil.copy(root / "tokenizer.json", init / "tokenizer.json")
    return {**paths, "init": str(init)}


def run(task, out, stage="grpo", **kw):
    base = dict(stage=stage, init=task["init"], data=task["grpo" if stage == "grpo" else "coldstart"], out=str(out), frames=4,
                lr=1e-3, prompts_per_step=2, micro_batch=2, group_size=3, max_new_tokens=6, steps=3, save_every=1, seed=0)
    base.update(kw)
    return train.train(train.TrainConfig(**base))


def weights(path):
    return W.published_state_dict(W.from_pretrained(path, dtype=torch.float32))


@pytest.mark.slow
def test_sft_then_grpo_then_sample(task, tmp_path, capsys, monkeypatch):
    m = run(task, tmp_path / "sft", stage="sft", steps=2)
    assert m["loss"] > 0 and m["tokens"] > 0
    before = weights(task["init"])
    after = weights(tmp_path / "sft" / "checkpoint")
    assert not torch.equal(before["language_model.model.norm.weight"], after["language_model.model.norm.weight"])
    vision = [k for k in before if k.startswith("vision_tower")]
    assert all(torch.equal(before[k], after[k]) for k in vision), "the vision tower is frozen"

    seen, real_update = [], train.update
    monkeypatch.setattr(train, "update", lambda model, exp, *a, **k: seen.append(exp) or real_update(model, exp, *a, **k))
    m = run(task, tmp_path / "grpo", init=str(tmp_path / "sft" / "checkpoint"))
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1] == json.loads(json.dumps(m))
    for r, exp in zip(rows, seen):  # the logged metrics are those of what each step learned from
        assert r["reward"] == pytest.approx(exp.scores["reward"].mean().item())
        assert r["accuracy"] == pytest.approx(exp.scores["accuracy"].mean().item())
        assert r["completion_length"] == pytest.approx(exp.rollout.mask.sum(1).mean().item())
        assert r["example"] == exp.texts[0] and math.isfinite(r["loss"]) and r["kl"] >= 0
    assert rows[0]["kl"] <= 1e-6 < rows[2]["kl"]  # the policy starts as the reference, then moves away
    assert (tmp_path / "grpo" / "curves.png").stat().st_size > 1000

    ckpt = str(tmp_path / "grpo" / "checkpoint")
    video = D.read_samples(task["test"])[0][0].video
    capsys.readouterr()
    assert sample.main(["--ckpt", ckpt, "--video", video, "--question", "What color?", "--options", "red", "blue",
                        "--max-new-tokens", "5"]) == 0
    model, tok = sample.load(ckpt)
    pixels = D.load_video(video, num_frames=4, size=model.config.vision.image_size)[None]
    answer = sample.generate(model, tok, [D.mc_question("What color?", ["red", "blue"])], pixels, max_new_tokens=5)[0]
    assert capsys.readouterr().out == answer + "\n"
    preds = tmp_path / "preds.jsonl"
    assert sample.main(["--ckpt", ckpt, "--eval", task["test"], "--predictions", str(preds), "--max-new-tokens", "5"]) == 0
    assert "accuracy" in capsys.readouterr().out
    lines = open(preds).read().splitlines()
    assert len(lines) == 8
    # a partial predictions file is resumed, not redone
    with open(preds, "w") as f:
        f.write("\n".join(lines[:5]) + "\n" + lines[5][:10])  # the last line cut short
    model, tok = sample.load(ckpt)
    samples = D.read_samples(task["test"])[0]
    res = sample.evaluate(model, tok, samples, predictions=str(preds), max_new_tokens=5, progress=False)
    assert res["total"] == 8
    assert len(sample.read_predictions(str(preds))) == 8  # 5 kept, 3 redone (the cut line among them)


@pytest.mark.slow
def test_resume_is_exact(task, tmp_path, capsys):
    run(task, tmp_path / "straight", steps=4)
    budget = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run budget:")]
    assert len(budget) == 1 and "rollout" in budget[0] and "4 steps" in budget[0]  # printed once, after step 3
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert all(r["time/rollout"] > 0 and r["time/policy"] > 0 and r["time/step"] > 0 for r in rows)
    run(task, tmp_path / "split", steps=4, stop_after=2)
    assert json.loads(open(tmp_path / "split" / "metrics.jsonl").read().splitlines()[-1])["step"] == 2
    run(task, tmp_path / "split", steps=4, resume=True)
    a, b = weights(tmp_path / "straight" / "checkpoint"), weights(tmp_path / "split" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert rows == [1, 2, 3, 4]


def test_bad_samples_are_skipped_and_counted(task, tmp_path):
    good = open(task["grpo"]).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    row = json.loads(good[0])
    missing = dict(row, video_filename="./videos/missing.mp4")
    bad.write_text("\n".join([good[0], json.dumps(missing), "{not json", good[1], json.dumps(missing), good[2]]) + "\n")
    os.symlink(os.path.join(os.path.dirname(task["grpo"]), "videos"), tmp_path / "videos")
    m = run(task, tmp_path / "run", data=str(bad), steps=2)
    assert m["skipped_samples"] >= 1
    state = train.load_state(str(tmp_path / "run" / "checkpoint"))
    assert all("missing.mp4" in s for s in state["skipped"])


def test_nan_loss_skips_the_step(task, tmp_path, monkeypatch):
    real = train.grpo.grpo_loss
    calls = []

    def flaky(*a, **k):
        loss, m = real(*a, **k)
        calls.append(1)
        return (loss * float("nan"), m) if len(calls) == 1 else (loss, m)

    monkeypatch.setattr(train.grpo, "grpo_loss", flaky)
    run(task, tmp_path / "run", steps=2)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["nan_steps"] == 1 and rows[1]["nan_steps"] == 1


def test_paper_defaults_per_stage_kl_clamp_flag_and_slow_tokenizer_files(task, tmp_path, monkeypatch):
    """Cold start: 4 samples per step (4 GPUs x 1 in the original), GRPO: 8 prompts; --no-kl-clamp reaches
    the loss; a directory with only the slow tokenizer's files is copied into checkpoints."""
    assert [train.TrainConfig(stage=s).prompts_per_step for s in ("sft", "grpo")] == [4, 8]
    assert train.TrainConfig(stage="sft", prompts_per_step=2).prompts_per_step == 2
    flags = lambda argv: {k: v for k, v in vars(train.parse_args(argv)[0]).items() if k != "demo"}
    cfg = train.TrainConfig(**flags(["--stage", "sft", "--data", "x"]))
    assert cfg.prompts_per_step == 4 and cfg.kl_clamp
    cfg = train.TrainConfig(**flags(["--data", "x", "--no-kl-clamp"]))
    assert cfg.prompts_per_step == 8 and not cfg.kl_clamp
    seen, real = [], train.grpo.grpo_loss
    monkeypatch.setattr(train.grpo, "grpo_loss", lambda *a, **k: seen.append(k["kl_clamp"]) or real(*a, **k))
    run(task, tmp_path / "clamped", steps=1)
    assert set(seen) == {100.0}
    run(task, tmp_path / "free", steps=1, kl_clamp=False)
    assert seen[-1] is None
    slow = tmp_path / "slow"
    slow.mkdir()
    with pytest.raises(train.RunError, match="no tokenizer.json"):
        train.tokenizer_file(str(slow))
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (slow / name).write_text("{}")
    assert [os.path.basename(p) for p in train.tokenizer_file(str(slow))] == ["vocab.json", "merges.txt", "added_tokens.json"]


def test_sample_errors_are_one_line(task, tmp_path, capsys):
    assert sample.main(["--ckpt", str(tmp_path / "nope"), "--video", "x.mp4", "--question", "q"]) == 2
    assert sample.main(["--ckpt", task["init"], "--video", str(tmp_path / "nope.mp4"), "--question", "q"]) == 2
    assert sample.main(["--ckpt", task["init"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sample.py: ") for line in err)


@pytest.mark.parametrize("text,mode,want", [
    ("<think>red</think> <answer>B</answer>", "reason", "B"),
    ("<think>x</think><answer>The answer is C. blue</answer>", "reason", "C"),
    ("B. sit down", "reason", None),
    ("B. sit down", "option", "B"),
    ("(D)", "option", "D"),
    ("I think A", "option", "A"),
    ("no letter here", "option", None),
])
def test_parse_answer(text, mode, want):
    assert sample.parse_answer(text, 4, mode) == want


@pytest.mark.slow  # compiles
@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")  # no silent fallback to eager
def test_one_step_the_same_however_it_is_batched_or_compiled(task):
    """train.collect (what train.py and bench.py both run): the step's prompts decoded one at a time
    or all together, eagerly or through the compiled decode step, give the same completions and
    rewards (greedy: same tokens; sampled: same per-prompt seeds)."""
    import torch._dynamo.utils
    torch._dynamo.reset()  # a fresh budget of 8 recompilations: every earlier test's model counted against it
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model, tok = train.load_model(train.TrainConfig(init=task["init"]), torch.device("cpu"))
    samples = D.read_samples(task["grpo"])[0][:3]
    load = D.VideoLoader(4, model.config.vision.image_size)
    ref = train.grpo.frozen_copy(model)
    results = {}
    for temperature in (0.0, 1.0):
        for rb, compiled in ((1, False), (3, False), (3, True)):
            cfg = train.TrainConfig(stage="grpo", group_size=3, max_new_tokens=10, temperature=temperature, rollout_batch=rb,
                                    micro_batch=2, noise_std=0)
            sampler = train.grpo.Sampler(model, compile=compiled)
            exp = train.collect(sampler, ref, tok, samples, load, cfg, torch.device("cpu"), torch.Generator().manual_seed(5))
            results[temperature, rb, compiled] = exp
        base = results[temperature, 1, False]
        for key in ((temperature, 3, False), (temperature, 3, True)):
            other = results[key]
            assert other.texts == base.texts, key
            assert torch.equal(other.scores["reward"], base.scores["reward"])
            if temperature:  # (log-probs at temperature 0 are not defined)
                assert (other.ref_logp - base.ref_logp).abs().max() <= 1e-5
    assert len(set(results[1.0, 3, False].texts)) > 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the compiled sampler did compile


def test_sft_loss_is_the_answer_cross_entropy_with_the_video_spliced_in():
    """sft_step's loss by hand: the full model's logits (L-1+Q positions), labels spliced like the ids (-100 on the
    Q video tokens), next-token cross-entropy averaged over each answer, then over samples; its gradient is that
    mean's, however the samples are split into micro-batches."""
    import copy
    from types import SimpleNamespace
    from conftest import tiny_model
    model = tiny_model(connector={"connector_type": "mlp2x_gelu"})  # Q = 2 frames x 3 patches
    img = M.IMAGE_TOKEN_INDEX
    pairs = [([5, 6, img, 7, 8, 9, 10], [-100] * 5 + [9, 10]), ([5, img, 7, 11, 12, 13], [-100] * 3 + [11, 12, 13])]
    tok = SimpleNamespace(pad_id=0, sft_ids=lambda question, answer, max_len: pairs[int(question)])
    pixels = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    load = lambda batch: (batch, pixels[[int(s.question) for s in batch]])
    samples = [D.Sample("video.mp4", str(i), "") for i in range(2)]
    grads = {}
    for micro in (2, 1):
        policy = copy.deepcopy(model)
        got = train.sft_step(policy, tok, samples, load, train.TrainConfig(stage="sft", micro_batch=micro), torch.device("cpu"))
        grads[micro] = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    want = []
    model.train()
    for (ids, labels), px in zip(pairs, pixels):
        logits = model(torch.tensor([ids]), px[None])[0]
        p, Q = ids.index(img), logits.shape[0] - len(ids) + 1
        spliced = torch.tensor(labels[:p] + [-100] * Q + labels[p + 1:])
        want.append(torch.nn.functional.cross_entropy(logits[:-1], spliced[1:], ignore_index=-100))
    loss = torch.stack(want).mean()
    assert Q == 6 and got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    hand = {n: p.grad for n, p in model.named_parameters() if n in grads[2]}
    assert set(grads[2]) == set(grads[1]) == set(hand) and not any(n.startswith("vision_tower") for n in hand)
    for micro in (2, 1):
        assert max(float((grads[micro][n] - hand[n]).abs().max()) for n in hand) <= 1e-5 * max(float(g.abs().max()) for g in hand.values())


def test_optimizer_step_refreshes_a_sampler_copy():
    """A sampler holding its own copy of the policy (bf16 on a GPU, --fsdp) samples from the updated weights
    after every optimizer step, and not after a skipped (non-finite) one."""
    from conftest import tiny_model
    policy = tiny_model(size="tiny")
    sampler = train.grpo.Sampler(policy, own_copy=True)
    assert sampler.model is not policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    assert train.optimizer_step(optimizer, params, sampler, max_grad_norm=0)
    theirs = dict(sampler.model.named_parameters())
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("vision_tower")]
    assert moved and all(torch.equal(theirs[n], dict(policy.named_parameters())[n]) for n in moved)
    before = {n: theirs[n].clone() for n in moved}
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    assert not train.optimizer_step(optimizer, params, sampler, max_grad_norm=1.0)
    assert all(torch.equal(theirs[n], before[n]) for n in moved)


@pytest.mark.slow
def test_held_out_evaluation_every_n_steps_at_the_end_and_after_a_resume(task, tmp_path):
    """--eval-data: scored at every --eval-every steps and the last, in both stages; a run stopped and resumed
    scores at the same steps, with the same figures; the reasoning figures where rows carry a "fact"."""
    kw = dict(eval_data=task["test"], eval_every=2, steps=5, save_every=1, compile=False)  # not about compiling
    run(task, tmp_path / "straight", **kw)
    run(task, tmp_path / "split", stop_after=3, **kw)
    run(task, tmp_path / "split", resume=True, **kw)
    evals = lambda out: [(r["step"], r["eval/accuracy"], r["eval/format"]) for r in map(json.loads, open(out / "metrics.jsonl"))  # noqa: E731
                         if "eval/accuracy" in r]
    assert [e[0] for e in evals(tmp_path / "straight")] == [2, 4, 5] and evals(tmp_path / "split") == evals(tmp_path / "straight")
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert 0 <= rows[-1]["eval/reasoning_accuracy"] <= 1 and 0 <= rows[-1]["eval/answer_agrees_with_reasoning"] <= 1
    run(task, tmp_path / "sft", stage="sft", eval_data=task["test"], steps=2, compile=False)  # 0: only at the end
    assert ["eval/accuracy" in json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")] == [False, True]


def test_an_extra_reward_reaches_the_loss(task, monkeypatch):
    """train(reward_fns=...) (the demo's --reward-reasoning): the extra reward is scored, logged and changes the
    advantages, hence the loss."""
    model, tok = train.load_model(train.TrainConfig(init=task["init"]), torch.device("cpu"))
    samples = D.read_samples(task["grpo"])[0][:2]
    load = D.VideoLoader(4, model.config.vision.image_size)
    cfg = train.TrainConfig(stage="grpo", group_size=3, max_new_tokens=6, micro_batch=2, noise_std=0, beta=0)
    bonus = {"bonus": lambda completion, solution: float(len(completion) % 2)}  # differs between a group's answers
    exps = [train.collect(train.grpo.Sampler(model), None, tok, samples, load, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(5), fns) for fns in (None, bonus)]
    assert exps[0].texts == exps[1].texts and "bonus" in exps[1].scores
    assert torch.equal(exps[1].scores["reward"], exps[0].scores["reward"] + exps[1].scores["bonus"])
    losses = []
    for exp in exps:
        model.zero_grad()
        train.update(model, exp, cfg, tok.pad_id, lambda: None)
        losses.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert any(not torch.equal(a, b) for a, b in zip(*losses))
