"""LoRA (model.py's adapters, train.py --lora) and the memory plan (train.py --dry-run), on tiny shapes (CPU)."""

import json

import pytest
import torch

import grpo as G
import model as M
import weights as W
import train
from conftest import tiny_model, tiny_prompt
from test_train import run, task, weights  # noqa: F401  (the tiny model and synthetic task)


def logits(model, ids, video):
    with torch.no_grad():
        x, mask = model.embed(ids, video)
        return model.language_model.logits(model.language_model.model(x, mask))


def with_random_adapters(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_fresh_adapters_change_nothing_and_adapters_off_are_the_base():
    model = tiny_model()
    ids, video = tiny_prompt(model)
    base = logits(model, ids, video)
    M.add_lora(model, rank=4, alpha=8)
    assert torch.equal(logits(model, ids, video), base)  # B = 0: the start is the base, exactly
    with_random_adapters(model)
    assert (logits(model, ids, video) - base).abs().max() > 1e-2
    with M.adapters_off(model):
        assert torch.equal(logits(model, ids, video), base)
    assert (logits(model, ids, video) - base).abs().max() > 1e-2  # back on


def test_gradients_reach_only_the_adapters_and_the_connector():
    model = with_random_adapters(M.add_lora(tiny_model(), rank=4, alpha=8))
    ids, pixels = tiny_prompt(model)[0], torch.randn(1, 2, 3, 16, 16)
    x, mask = model.embed(ids, model.encode_video(pixels))
    model.language_model.logits(model.language_model.model(x, mask)).square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = {n for n, _ in model.named_parameters() if n.startswith("connector.") or n.endswith(("lora_A", "lora_B"))}
    assert got == want and len([n for n in want if "lora" in n]) == 2 * 7 * len(model.language_model.model.layers)
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}


def test_merged_weights_equal_the_adapters():
    model = tiny_model()
    ids, video = tiny_prompt(model)
    base = logits(model, ids, video)
    with_random_adapters(M.add_lora(model, rank=4, alpha=8), std=0.05)
    plain = M.TinyLLaVA(model.config).eval()
    plain.load_state_dict(M.merge_lora(model.state_dict(), 8 / 4))
    assert (logits(model, ids, video) - base).abs().max() > 1e-2  # the adapters matter
    # fp32 rounding of W + s B A against W x + s B (A x), through the tiny model's 20x weights: relative 1e-5
    assert (logits(plain, ids, video) - logits(model, ids, video)).abs().max() <= 1e-5 * base.abs().max()


def published(tmp_path):
    """A config.json in the published layout (TinyLLaVA-Video-R1: Qwen2.5-3B decoder, SigLIP so400m, group
    resampler 16 x 32), and no weights at all."""
    text = dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6)
    config = dict(connector_type="groupresampler", group=16, num_queries=512, num_resampler_layers=3, hidden_size=2048,
                  vocab_size=151936, image_token_index=-200, tokenizer_model_max_length=3072, pad_token="<|endoftext|>",
                  torch_dtype="bfloat16", text_config=text, vision_config=vision)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def plan(capsys, *flags):
    assert train.main(list(flags) + ["--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), out


def test_dry_run_at_the_published_shapes(tmp_path, capsys):
    init = published(tmp_path)
    full, lines = plan(capsys, "--init", init)
    assert "memory plan" in lines[0] and any(line.split()[0] == "total" for line in lines)
    lora = plan(capsys, "--init", init, "--lora", "16")[0]
    assert 60 <= full["total_gb"] <= 85 and lora["total_gb"] <= 24  # the paper's GRPO shapes: G 8, 512 tokens, 16 frames
    assert lora["parts"]["sampler"] == 0 and lora["parts"]["reference"] < 0.5 and full["parts"]["reference"] > 6
    assert 0.4 < lora["parts"]["gradients"] < 0.7  # connector 0.116 B + adapters 16 x 51,968 x 36, fp32
    assert abs(full["parts"]["weights"] - 4 * 3.202) < 0.05  # decoder 3.086 B + connector 0.116 B, fp32
    dp, fsdp = (plan(capsys, "--init", init, "--nproc", "8", *f)[0] for f in ([], ["--fsdp"]))
    assert dp["parts"]["optimizer"] == full["parts"]["optimizer"] and fsdp["parts"]["optimizer"] * 8 == pytest.approx(full["parts"]["optimizer"], 1e-3)
    assert dp["parts"]["rollout KV cache"] < full["parts"]["rollout KV cache"]  # one prompt a rank, not 8
    grows = {"--micro-batch": ("2", "activations"), "--group-size": ("16", "rollout KV cache"),
             "--max-new-tokens": ("1024", "rollout KV cache"), "--frames": ("32", "video features")}
    for flag, (value, part) in grows.items():
        assert plan(capsys, "--init", init, flag, value)[0]["parts"][part] > full["parts"][part], flag
    assert plan(capsys, "--init", init, "--rollout-batch", "2")[0]["parts"]["rollout KV cache"] < full["parts"]["rollout KV cache"]
    assert train.main(["--init", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow  # three tiny runs, one of them compiling its decode step
def test_lora_run_checkpoints_merged_and_resumes_exactly(task, tmp_path, capsys, monkeypatch):
    base, real_collect, ref_err, moved = W.from_pretrained(task["init"], dtype=torch.float32), train.collect, [], []

    def collect(sampler, ref, tok, samples, load, cfg, device, gen, *rest):  # the reference's log-probs are the start model's
        exp = real_collect(sampler, ref, tok, samples, load, cfg, device, gen, *rest)
        with torch.no_grad():
            for ids, pmask, feats, comp, cmask, rows, T in exp.micro_batches(cfg.micro_batch, tok.pad_id):
                want = G.completion_logprobs(base, ids, base.connect(feats), comp, cmask, pmask, cfg.temperature)
                ref_err.append(float((exp.ref_logp[rows, :T] - want).abs().max()))
                moved.append(float((exp.rollout.logprobs[rows, :T] - want).abs().max()))  # the rollouts: adapters on
        return exp

    common = dict(lora=4, steps=3, compile=False)
    monkeypatch.setattr(train, "collect", collect)
    run(task, tmp_path / "straight", **{**common, "compile": True})  # adapters in the compiled decode step
    monkeypatch.undo()
    assert len(ref_err) == 3 and max(ref_err) <= 1e-5 and moved[0] <= 1e-5 and moved[-1] > 1e-3
    printed = capsys.readouterr().out
    dry = plan(capsys, "--init", task["init"], "--lora", "4", "--frames", "4", "--prompts-per-step", "2",
               "--micro-batch", "2", "--group-size", "3", "--max-new-tokens", "6", "--lr", "1e-3", "--no-compile")[1]
    assert "\n".join(dry) in printed  # a run prints the plan --dry-run prints
    run(task, tmp_path / "split", stop_after=1, **common)  # eager from here: the same samples, bit for bit
    run(task, tmp_path / "split", resume=True, **common)
    ckpt = tmp_path / "split" / "checkpoint"
    a, b, start = weights(tmp_path / "straight" / "checkpoint"), weights(ckpt), weights(task["init"])
    assert a.keys() == start.keys() and all(torch.equal(a[k], b[k]) for k in a)  # published keys, merged; bit-identical
    assert not any(torch.equal(a[k], start[k]) for k in a if k.startswith("language_model.") and k.endswith("proj.weight"))
    frozen = [k for k in a if k.startswith("vision_tower") or (k.startswith("language_model") and ("norm" in k or "embed" in k))]
    assert frozen and all(torch.equal(a[k], start[k]) for k in frozen)
    state = train.load_state(str(ckpt))
    trained, connector = set(state["lora"]), {"connector." + n for n, _ in base.connector.named_parameters()}
    assert connector <= trained and len([n for n in trained - connector if n.endswith(("lora_A", "lora_B"))]) == len(trained - connector) == 2 * 7 * 2
    assert len(state["optimizer"]["state"]) == len(trained)  # AdamW state of the adapters and the connector only
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["kl"] > 0  # the reference is the start, not the policy
