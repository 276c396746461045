"""model.py against numerical references: transformers' Qwen2 and SigLIP, and a resampler written
here from the published checkpoints' description (perceiver layers per group of frames). Tiny random models, built in the tests; nothing is downloaded."""

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel  # missing: fail, not skip

import model as M
import weights

TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_channels=3,
              image_size=30, patch_size=6, layer_norm_eps=1e-6)  # 5 x 5 = 25 patches, 24 after dropping token 0


def randomize(module, seed):
    """Random values everywhere (biases and norm weights too), so no parameter is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


def hf_qwen(seed=0):
    torch.manual_seed(seed)
    ref = Qwen2ForCausalLM(Qwen2Config(**TEXT, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norm weights away from their init
    return ref


def hf_siglip(seed=0):
    torch.manual_seed(seed)
    ref = SiglipVisionModel(SiglipVisionConfig(**VISION, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def siglip_state(ref):
    """SigLIP tensors under their published names (`vision_model.*`), whatever transformers' version calls them."""
    return {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in ref.state_dict().items()}


def ours_qwen(ref):
    lm = M.Qwen2ForCausalLM(M.TextConfig(**TEXT)).eval()
    missing, unexpected = lm.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and unexpected == ["lm_head.weight"]
    return lm


# ----------------------------------------------------------------------------- decoder


def test_decoder_matches_transformers_qwen2():
    ref = hf_qwen()
    lm = ours_qwen(ref)
    ids = torch.randint(0, TEXT["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = lm(ids)
    diff = (got - want).abs().max().item()
    print(f"decoder max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_decoder_right_padding_matches_unpadded_rows():
    lm = ours_qwen(hf_qwen())
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 96, (1, 20), generator=g), torch.randint(0, 96, (1, 13), generator=g)
    batch = torch.cat([a, F.pad(b, (0, 7), value=5)])
    mask = torch.tensor([[1] * 20, [1] * 13 + [0] * 7])
    with torch.no_grad():
        padded = lm(batch, mask)
        assert (padded[0] - lm(a)[0]).abs().max() <= 1e-5
        assert (padded[1, :13] - lm(b)[0]).abs().max() <= 1e-5


def test_unmasked_causal_path_equals_the_masked_path_and_transformers():
    """Without left padding the decoder calls SDPA with is_causal=True and no mask (the flash
    kernel on a GPU); with left padding it builds the mask. Both against each other and against
    transformers, with gradients, for no padding and for right padding (completions that end early)."""
    ref = hf_qwen()
    lm = ours_qwen(ref)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(11))
    x = lm.model.embed_tokens(ids).detach().requires_grad_(True)
    right = torch.ones(2, 19, dtype=torch.bool)
    right[1, 12:] = False
    calls = []
    sdpa = F.scaled_dot_product_attention
    spy = lambda *a, **k: calls.append("mask" if k.get("attn_mask") is not None else "causal") or sdpa(*a, **k)
    F.scaled_dot_product_attention = spy
    try:
        for mask in (None, right):
            calls.clear()
            fast = lm.model(x, mask)  # the causal path: no row has padding before a real token
            assert set(calls) == {"causal"}
            calls.clear()
            slow = lm.model.run_layers(x, torch.ones_like(right) if mask is None else mask)  # the mask, forced
            assert set(calls) == {"mask"}
            real = right if mask is not None else torch.ones_like(right)
            assert (fast - slow)[real].abs().max() <= 1e-5
            g_fast, = torch.autograd.grad((fast[real] ** 2).sum(), x)
            g_slow, = torch.autograd.grad((slow[real] ** 2).sum(), x)
            assert (g_fast - g_slow).abs().max() <= 1e-4
        calls.clear()
        lm.model(x, right.flip(1))  # left padding: the mask is needed
        assert set(calls) == {"mask"}
    finally:
        F.scaled_dot_product_attention = sdpa
    with torch.no_grad():
        want = ref(ids, attention_mask=right.long()).logits
        got = lm.logits(lm.model(x, right))
    assert (got - want)[right].abs().max() <= 1e-4


def test_prefill_then_cached_decoding_equals_full_forward():
    lm = ours_qwen(hf_qwen())
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = lm(ids)
        cache = M.KVCache(lm.cfg, batch=2, max_len=40)
        steps = [lm(ids[:, :10], cache=cache)]
        for t in range(10, 24):
            steps.append(lm(ids[:, t:t + 1], cache=cache))
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"cached decoding vs full forward: {diff:.2e}")
    assert diff <= 1e-5
    assert cache.length == 24 and cache.next_pos.tolist() == [24, 24]


def test_left_padded_prefill_then_decoding_matches_unpadded():
    """The rollout layout: prompts of different lengths left-padded, then every row writes the same slot."""
    lm = ours_qwen(hf_qwen())
    g = torch.Generator().manual_seed(4)
    long, short, cont = torch.randint(0, 96, (1, 12), generator=g), torch.randint(0, 96, (1, 7), generator=g), torch.randint(0, 96, (2, 5), generator=g)
    batch = torch.cat([long, F.pad(short, (5, 0), value=3)])
    mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
    with torch.no_grad():
        cache = M.KVCache(lm.cfg, batch=2, max_len=20)
        lm(batch, mask, cache=cache)
        got = torch.cat([lm(cont[:, t:t + 1], cache=cache) for t in range(5)], dim=1)
        want_long = lm(torch.cat([long, cont[:1]], 1))[:, 12:]
        want_short = lm(torch.cat([short, cont[1:]], 1))[:, 7:]
    assert (got[0] - want_long[0]).abs().max() <= 1e-5
    assert (got[1] - want_short[0]).abs().max() <= 1e-5


def test_cache_repeat_interleave_shares_a_prefill():
    lm = ours_qwen(hf_qwen())
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(5))
    nxt = torch.tensor([[1], [2], [3]])
    with torch.no_grad():
        cache = M.KVCache(lm.cfg, batch=1, max_len=12)
        lm(ids, cache=cache)
        group = cache.repeat_interleave(3)
        got = lm(nxt, cache=group)[:, -1]
        want = lm(torch.cat([ids.expand(3, -1), nxt], 1))[:, -1]
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="KV cache full"):
        lm(torch.zeros(3, 4, dtype=torch.long), cache=group)


def test_cache_select_rows_keeps_the_rows_asked_for_in_their_order():
    """Finished samples leave a rollout's batch: rows (2, 0) of a 3-row cache decode on as rows 2 and 0 of
    the whole one did (left-padded prompts, so valid and next_pos differ per row)."""
    lm = ours_qwen(hf_qwen())
    g = torch.Generator().manual_seed(6)
    ids, nxt = torch.randint(0, 96, (3, 8), generator=g), torch.randint(0, 96, (3, 2), generator=g)
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2])
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        cache = M.KVCache(lm.cfg, batch=3, max_len=12)
        lm(ids, mask, cache=cache)
        part = cache.select_rows(rows)
        assert torch.equal(part.valid, cache.valid[rows]) and torch.equal(part.next_pos, cache.next_pos[rows])
        want = lm(nxt, cache=cache)[rows]
        got = lm(nxt[rows], cache=part)
    assert (got - want).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- vision encoder


def test_vision_encoder_matches_transformers_siglip_layer_minus_2():
    ref = hf_siglip()
    cfg = M.TinyLLaVAConfig(vision=M.VisionConfig(**VISION))
    assert cfg.vision_layers_used == 2  # hidden_states[-2] of 3 layers: layer 3 is never built or run
    enc = M.SiglipVisionEncoder(cfg.vision, cfg.vision_layers_used).eval()
    missing, unexpected = enc.load_state_dict({k[len("vision_model."):]: v for k, v in siglip_state(ref).items()}, strict=False)
    assert not missing and sorted({k.split(".")[0] + "." + k.split(".")[1] if k.startswith("encoder") else k.split(".")[0] for k in unexpected}) == ["encoder.layers", "head", "post_layernorm"]
    px = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = ref(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = enc(px)[:, 1:]
    diff = (got - want).abs().max().item()
    print(f"vision encoder max abs diff vs transformers: {diff:.2e}")
    assert got.shape == (4, 24, 48) and diff <= 1e-5


# ----------------------------------------------------------------------------- connectors


def reference_group_resampler(x, sd, group, heads=8, dim_head=64):
    """Written from the description of TinyLLaVA's resampler with explicit einsums, independent of model.py."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    x = x @ sd["linear.weight"].T + sd["linear.bias"]
    L = x.shape[1]
    sizes = [L // group + (1 if i < L % group else 0) for i in range(group)]
    outs, start = [], 0
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for size in sizes:
        chunk, lat = x[:, start:start + size], sd["latents"][None].expand(x.shape[0], -1, -1)
        start += size
        for i in range(n_layers):
            p = f"layers.{i}."
            m, l = ln(chunk, p + "0.norm_media"), ln(lat, p + "0.norm_latents")
            q = l @ sd[p + "0.to_q.weight"].T
            kv = torch.cat([m, l], 1) @ sd[p + "0.to_kv.weight"].T
            k, v = kv[..., :heads * dim_head], kv[..., heads * dim_head:]
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim_head)
            att = torch.einsum("bihd,bjhd->bhij", split(q), split(k)) / math.sqrt(dim_head)
            o = torch.einsum("bhij,bjhd->bihd", att.softmax(-1), split(v)).reshape(q.shape[0], q.shape[1], -1)
            lat = o @ sd[p + "0.to_out.weight"].T + lat
            h = ln(lat, p + "1.0") @ sd[p + "1.1.weight"].T
            lat = F.gelu(h) @ sd[p + "1.3.weight"].T + lat
        outs.append(ln(lat, "norm"))
    out = torch.cat(outs, 1)
    n, d = out.shape[1:]
    pe = torch.zeros(n, d)
    for pos in range(n):
        for i in range(0, d, 2):
            angle = pos / 10000 ** (i / d)
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return out + pe.half().float()


CONN = dict(connector_type="groupresampler", num_queries=12, group=4, num_resampler_layers=2, vision_hidden_size=48, hidden_size=64)


@pytest.mark.parametrize("tokens", [24, 26, 23])  # even split, and the first L % group chunks one longer
def test_group_resampler_matches_reference(tokens):
    torch.manual_seed(7)
    conn = M.build_connector(M.ConnectorConfig(**CONN)).eval()
    randomize(conn, 8)
    assert set(conn.state_dict()) >= {"latents", "linear.weight", "layers.1.0.to_kv.weight", "layers.0.1.0.bias", "layers.1.1.3.weight", "norm.weight"}
    x = torch.randn(2, tokens, 48)
    with torch.no_grad():
        got, want = conn(x), reference_group_resampler(x, conn.state_dict(), group=4)
    assert got.shape == (2, 12, 64)
    assert (got - want).abs().max() <= 1e-4


def test_naive_resampler_and_mlp_connectors():
    torch.manual_seed(9)
    naive = randomize(M.build_connector(M.ConnectorConfig(**{**CONN, "connector_type": "naiveresampler"})), 10).eval()
    x = torch.randn(2, 26, 48)
    # naive = one group over all tokens, position table added to the (linear-projected) input instead
    sd = naive.state_dict()
    pe = M.sinusoid_table(26, 64).float()
    lin = x @ sd["linear.weight"].T + sd["linear.bias"]
    sd_nolinear = {**sd, "linear.weight": torch.eye(64), "linear.bias": torch.zeros(64)}
    want = reference_group_resampler(lin + pe, sd_nolinear, group=1) - M.sinusoid_table(12, 64).float()
    with torch.no_grad():
        assert naive.latents.shape == (12, 64)
        assert (naive(x) - want).abs().max() <= 1e-4
    mlp = M.build_connector(M.ConnectorConfig(connector_type="mlp2x_gelu", vision_hidden_size=48, hidden_size=64))
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
        assert torch.allclose(mlp(x), want)
    with pytest.raises(ValueError, match="unknown connector_type 'qformer'"):
        M.build_connector(M.ConnectorConfig(connector_type="qformer"))


# ----------------------------------------------------------------------------- whole model, published layout


def tiny_config_json(connector=None):
    return {"architectures": ["TinyLlavaForConditionalGeneration"], **(connector or CONN), "image_token_index": -200,
            "image_aspect_ratio": "square", "tokenizer_model_max_length": 3072, "tokenizer_padding_side": "right",
            "pad_token": "<|endoftext|>", "torch_dtype": "float32", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "patch", "vision_hidden_size": 48,
            "text_config": {**TEXT, "model_type": "qwen2"}, "vision_config": {**VISION, "model_type": "siglip_vision_model"},
            "some_future_field": {"ignored": True}}


def write_published(path, refs, dtype=torch.float32, shards=2, extra=None, drop=()):
    """A checkpoint exactly as published: prefixed keys, SigLIP's unused tail included, no lm_head."""
    qwen, siglip, conn = refs
    state = {}
    state.update({"language_model." + k: v for k, v in qwen.state_dict().items() if k != "lm_head.weight"})
    state.update({"vision_tower._vision_tower." + k: v for k, v in siglip_state(siglip).items()})
    state.update({"connector._connector." + k: v for k, v in conn.state_dict().items()})
    state.update(extra or {})
    state = {k: v.to(dtype).contiguous() for k, v in state.items() if k not in drop}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(tiny_config_json(), f)
    keys = sorted(state)
    parts = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"))
        return state
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return state


@pytest.fixture(scope="module")
def refs():
    conn = randomize(M.build_connector(M.ConnectorConfig(**CONN)), 11).eval()
    return hf_qwen(12), hf_siglip(13), conn


def reference_logits(refs, ids, pixels):
    qwen, siglip, conn = refs
    B, T = pixels.shape[:2]
    feats = siglip(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
    video = reference_group_resampler(feats.reshape(B, -1, feats.shape[-1]), conn.state_dict(), group=CONN["group"])
    rows = []
    for b in range(B):
        p = (ids[b] == -200).nonzero().item()
        emb = qwen.get_input_embeddings()
        rows.append(torch.cat([emb(ids[b, :p]), video[b], emb(ids[b, p + 1:])]))
    return qwen(inputs_embeds=torch.stack(rows)).logits


def prompt_ids(B, L, positions, seed=14):
    ids = torch.randint(0, 96, (B, L), generator=torch.Generator().manual_seed(seed))
    for b, p in enumerate(positions):
        ids[b, p] = M.IMAGE_TOKEN_INDEX
    return ids


def test_published_checkpoint_loads_and_matches_reference_composition(tmp_path, refs):
    write_published(tmp_path / "ckpt", refs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field is present: nothing to warn about
        model = weights.from_pretrained(str(tmp_path / "ckpt"))
    assert model.config.connector.group == 4 and model.config.text.num_hidden_layers == 2
    assert not any(p.is_meta for p in model.parameters())
    ids = prompt_ids(2, 10, [3, 0])  # the placeholder at any position
    pixels = torch.randn(2, 4, 3, 30, 30, generator=torch.Generator().manual_seed(15))  # T=4 frames -> 96 tokens
    with torch.no_grad():
        got, want = model(ids, pixels), reference_logits(refs, ids, pixels)
    diff = (got - want).abs().max().item()
    print(f"whole model max abs logit diff vs reference composition: {diff:.2e}")
    assert got.shape == (2, 10 - 1 + 12, 96) and diff <= 1e-4
    assert model.encode_video(pixels).shape == (2, 12, 64)


def test_whole_model_right_padding_and_placeholder_checks(tmp_path, refs):
    write_published(tmp_path / "ckpt", refs, shards=1)
    model = weights.from_pretrained(str(tmp_path / "ckpt"))
    pixels = torch.randn(2, 4, 3, 30, 30, generator=torch.Generator().manual_seed(16))
    full = prompt_ids(1, 11, [2], seed=17)
    short = prompt_ids(1, 6, [4], seed=18)
    batch = torch.cat([full, F.pad(short, (0, 5), value=7)])
    mask = torch.tensor([[1] * 11, [1] * 6 + [0] * 5])
    with torch.no_grad():
        padded = model(batch, pixels, mask)
        assert (padded[0] - model(full, pixels[:1])[0]).abs().max() <= 1e-5
        assert (padded[1, :6 - 1 + 12] - model(short, pixels[1:])[0]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="exactly one IMAGE_TOKEN_INDEX"):
            model(torch.randint(0, 96, (2, 5)), pixels)


def test_mlp_connector_output_count_and_bf16_round_trip(tmp_path):
    cfg = M.TinyLLaVAConfig(vision=M.VisionConfig(**VISION), text=M.TextConfig(**TEXT),
                            connector=M.ConnectorConfig(connector_type="mlp2x_gelu", vision_hidden_size=48, hidden_size=64))
    model = M.TinyLLaVA(cfg).to(torch.bfloat16)
    weights.save_pretrained(model, str(tmp_path / "bf16"))
    for dtype in (None, torch.float32):
        back = weights.from_pretrained(str(tmp_path / "bf16"), dtype=dtype)
        for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
            assert b.dtype == (dtype or torch.bfloat16), k
            assert torch.equal(a.float(), b.float()), k
    with torch.no_grad():
        assert back.encode_video(torch.randn(1, 3, 3, 30, 30)).shape == (1, 3 * 24, 64)  # per token, T*24


def test_save_load_round_trip_is_bit_identical_and_sharded(tmp_path, refs):
    write_published(tmp_path / "ckpt", refs)
    model = weights.from_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # files beside the weights survive a save
    weights.save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "model-00001-of-" in files[1]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    saved = {}
    for f in files:
        if f.endswith(".safetensors"):
            saved.update(load_file(str(tmp_path / "out" / f)))
    assert set(saved) == set(weights.published_state_dict(model))
    assert all(k.startswith(("language_model.model.", "vision_tower._vision_tower.vision_model.", "connector._connector.")) for k in saved)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["some_future_field"] == {"ignored": True} and cfg["connector_type"] == "groupresampler" and cfg["group"] == 4
    back = weights.from_pretrained(str(tmp_path / "out"))
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    weights.save_pretrained(model, str(tmp_path / "out"))  # overwriting an existing checkpoint works too
    assert weights.from_pretrained(str(tmp_path / "out")).config.text.hidden_size == 64


def test_load_then_save_writes_every_tensor_it_read(tmp_path, refs):
    """SigLIP's unused last layer, post_layernorm and head (and a tied lm_head) go back out as read, so the
    original code finds what it expects; config fields it needs are kept."""
    lm_head = {"language_model.lm_head.weight": torch.randn(96, 64)}
    state = write_published(tmp_path / "ckpt", refs, dtype=torch.bfloat16, extra=lm_head)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    paths = {"llm_model_name_or_path": "Qwen/Qwen2.5-3B", "vision_model_name_or_path": "google/siglip-so400m-patch14-384"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, **paths}))
    model = weights.from_pretrained(str(tmp_path / "ckpt"))
    unused = [k for k in state if "post_layernorm" in k or ".head." in k or "encoder.layers.2." in k]
    assert unused and sorted(model.unused_tensors) == sorted(unused + list(lm_head))
    weights.save_pretrained(model, str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], state[k]) for k in state)
    assert json.loads((tmp_path / "out" / "config.json").read_text()).items() >= paths.items()


def test_missing_config_fields_take_defaults():
    with pytest.warns(UserWarning, match="no vision_config"):
        cfg = M.TinyLLaVAConfig.from_dict({"text_config": {"hidden_size": 64, "rope_parameters": {"rope_theta": 5.0}}, "unknown": 1})
    assert cfg.vision.hidden_size == 1152 and cfg.connector.group == 16 and cfg.connector.num_queries == 512
    assert cfg.vision_feature_layer == -2 and cfg.vision_layers_used == 26 and cfg.text.rope_theta == 5.0
    assert cfg.connector.hidden_size == 64 and cfg.text.vocab_size == 151936


# ----------------------------------------------------------------------------- strict loading errors


def test_every_loading_problem_in_one_error_naming_files(tmp_path, refs):
    extra = {"connector._connector.surprise": torch.zeros(2)}
    state = write_published(tmp_path / "bad", refs, extra=extra, drop=("language_model.model.norm.weight",))
    # a shape mismatch: rewrite one tensor with the wrong shape in its shard
    index = json.loads((tmp_path / "bad" / "model.safetensors.index.json").read_text())
    key = "connector._connector.latents"
    shard = tmp_path / "bad" / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(5, 64)
    save_file(tensors, str(shard))
    with pytest.raises(weights.CheckpointError) as err:
        weights.from_pretrained(str(tmp_path / "bad"))
    msg = str(err.value)
    assert "missing key: language_model.model.norm.weight" in msg
    assert f"unexpected key: connector._connector.surprise (in {index['weight_map']['connector._connector.surprise']})" in msg
    assert f"shape mismatch: {key}: (5, 64) in {shard.name}, model expects (3, 64)" in msg
    assert "missing key: " + key not in msg
    # known-unused keys are not reported: SigLIP's last layer, post-layernorm and head
    assert "post_layernorm" not in msg and "encoder.layers.2" not in msg and "head." not in msg
    assert len(state) > 0


def test_lm_head_is_unexpected_only_when_untied(tmp_path, refs):
    write_published(tmp_path / "ckpt", refs, extra={"language_model.lm_head.weight": torch.zeros(96, 64)})
    weights.from_pretrained(str(tmp_path / "ckpt"))  # tied: ignored
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ckpt2").mkdir()
    write_published(tmp_path / "ckpt2", refs)
    (tmp_path / "ckpt2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointError, match="missing key: language_model.lm_head.weight"):
        weights.from_pretrained(str(tmp_path / "ckpt2"))
    assert weights.from_pretrained(str(tmp_path / "ckpt")).language_model.lm_head is not None


def test_missing_files_name_the_path(tmp_path, refs):
    with pytest.raises(weights.CheckpointError, match=r"config.json: not found"):
        weights.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config_json()))
    with pytest.raises(weights.CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        weights.from_pretrained(str(tmp_path / "empty"))
    write_published(tmp_path / "shards", refs)
    os.remove(tmp_path / "shards" / "model-00002-of-00002.safetensors")
    with pytest.raises(weights.CheckpointError, match="shards that are missing: .*model-00002-of-00002"):
        weights.from_pretrained(str(tmp_path / "shards"))
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(weights.CheckpointError, match="not valid JSON"):
        weights.from_pretrained(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- from parts


def test_from_parts_siglip_dual_encoder_and_qwen2(tmp_path, refs):
    qwen, siglip, _ = refs
    vdir, ldir = tmp_path / "siglip", tmp_path / "qwen"
    vdir.mkdir(), ldir.mkdir()
    vstate = {k: v.contiguous() for k, v in siglip_state(siglip).items()}
    vstate["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)  # the unused text tower
    vstate["logit_scale"] = torch.zeros(1)
    save_file(vstate, str(vdir / "model.safetensors"))
    (vdir / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": VISION, "text_config": {}}))
    save_file({k: v.clone() for k, v in qwen.state_dict().items()}, str(ldir / "model.safetensors"))
    (ldir / "config.json").write_text(json.dumps({**TEXT, "model_type": "qwen2", "torch_dtype": "float32"}))
    model = weights.from_parts(str(vdir), str(ldir), connector="groupresampler", num_queries=8, group=2, num_resampler_layers=1)
    assert model.config.connector.vision_hidden_size == 48 and model.connector.latents.shape == (4, 64)
    assert torch.equal(model.language_model.model.embed_tokens.weight, qwen.model.embed_tokens.weight)
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight, vstate["vision_model.embeddings.patch_embedding.weight"])
    assert not any(p.is_meta for p in model.parameters())
    ids = prompt_ids(1, 5, [1])
    with torch.no_grad():
        assert model(ids, torch.randn(1, 2, 3, 30, 30)).shape == (1, 4 + 8, 96)
    # a model made from parts saves in the published layout and loads back
    weights.save_pretrained(model, str(tmp_path / "joined"))
    back = weights.from_pretrained(str(tmp_path / "joined"))
    assert torch.equal(back.connector.latents, model.connector.latents)
    # the original code rebuilds its configs from the source paths, and holds all of SigLIP (not its text tower)
    cfg = json.loads((tmp_path / "joined" / "config.json").read_text())
    assert (cfg["llm_model_name_or_path"], cfg["vision_model_name_or_path"]) == (str(ldir), str(vdir))
    saved = load_file(str(tmp_path / "joined" / "model.safetensors"))
    assert {"vision_tower._vision_tower." + k for k in vstate if k.startswith("vision_model.")} <= set(saved)
    assert not [k for k in saved if "text_model" in k or "logit_scale" in k or "lm_head" in k]
    assert set(weights.published_state_dict(weights.from_pretrained(str(tmp_path / "joined")))) == set(saved)
