"""The fast decode path and bench.py: the decode step is one static graph (no recompiles, no host
syncs), the compiled step samples exactly what the eager one does, and `bench.py --tiny` runs end
to end. On CPU: CUDA graphs are exercised only by bench.py on a GPU."""

import json

import pytest
import torch

import bench
import grpo as G
import model as M
from grpo import rollout


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are thousands of tiny ops: on a busy 2-core machine, waking a second OpenMP thread
    for each costs more than the op (here bench --tiny took 2 s on one thread, 38 s on two while
    another job ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0):
    """bench.py's tiny model with its weights scaled up, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = M.TinyLLaVA(bench.tiny_config()).eval()
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.mul_(20 if p.ndim == 2 else 1)
    return model


def prompt(model, shapes=bench.TINY):
    ids, pixels = bench.inputs(model.config, shapes, torch.device("cpu"), seed=1)
    with torch.no_grad():
        return ids, model.encode_video(pixels)


class GraphCounter:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_decode_step_is_one_graph_for_every_step_and_cache():
    """What a CUDA graph needs: every step, on any cache of the same shape, is the same graph, and
    fullgraph=True means no graph breaks, so no host syncs (.item(), branches on values) inside."""
    model = tiny_model()
    lm = model.language_model
    ids, video = prompt(model)
    embeds, mask = model.embed(ids, video)
    counter = GraphCounter()
    step = torch.compile(lm.step_logits, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # two rollouts, two caches
            cache = model.new_cache(1, embeds.shape[1] + 6)
            lm.model(embeds, mask, cache)
            cache, twin = cache.repeat_interleave(3), cache.repeat_interleave(3)
            tok = torch.arange(3)
            for t in range(6):
                cache.reserve(1)
                got = step(tok, cache)
                want = lm.decode_step(tok, twin)
                assert torch.equal(got, want), t
                tok = got.argmax(-1)
            assert cache.length == twin.length == embeds.shape[1] + 6 == int(cache.pos)
            assert all(map(torch.equal, cache.k + cache.v, twin.k + twin.v)) and torch.equal(cache.valid, twin.valid) and torch.equal(cache.next_pos, twin.next_pos)
    assert counter.graphs == 1


def test_compiled_rollout_samples_what_the_eager_one_does():
    """torch.compile (inductor) of the decode step, through grpo.rollout: greedy, 2 prompts x 8
    samples, 24 steps with an eos that some rows reach, so the early-stop check runs 3 times."""
    model = tiny_model()
    ids, video = prompt(model)
    ids, video = ids.repeat(2, 1), torch.cat([video, video.flip(1)])  # two prompts that differ
    with torch.no_grad():
        probe = rollout(model, ids, video, eos_id=-1, pad_id=0, group_size=8, max_new_tokens=24, temperature=0)
        # eos: a token the first prompt's samples make after a few steps and the second's never do
        seen = set(probe.completion_ids[8].tolist())
        eos = next(int(t) for t in probe.completion_ids[0, 4:] if int(t) not in seen)
        eager = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=8, max_new_tokens=24, temperature=0)
        fast = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=8, max_new_tokens=24, temperature=0,
                       decode=G.FastDecode(model.language_model))
    assert eager.mask.sum(1).min() < 24 and eager.truncated.any()  # some rows stopped early, some did not
    assert torch.equal(fast.completion_ids, eager.completion_ids)
    assert torch.equal(fast.mask, eager.mask) and torch.equal(fast.truncated, eager.truncated)
    assert (fast.logprobs - eager.logprobs).abs().max() <= 1e-4


def test_fast_step_keeps_the_cache_bounds_check():
    model = tiny_model()
    lm = model.language_model
    ids, video = prompt(model)
    embeds, mask = model.embed(ids, video)
    fast = G.FastDecode(lm, compile=False)
    with torch.no_grad():
        cache = model.new_cache(1, embeds.shape[1] + 1)
        lm.model(embeds, mask, cache)
        fast(torch.zeros(1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="KV cache full"):
            fast(torch.zeros(1, dtype=torch.long), cache)


def test_bench_decode_check_catches_a_wrong_fast_step():
    model = tiny_model()
    lm = model.language_model
    ids, video = prompt(model)
    embeds, mask = model.embed(ids, video)

    def check(fast_step):
        return bench.check_decode(model, lm.decode_step, fast_step, embeds, mask, group=2, steps=6,
                                  max_len=embeds.shape[1] + 7, tol=1e-4)

    assert check(lm.decode_step)["ok"]
    off_by_one_position = lambda tokens, cache: (cache.next_pos.add_(1), lm.decode_step(tokens, cache))[1]
    bad = check(off_by_one_position)
    assert not bad["ok"] and bad["max_abs_logit_diff"] > 1e-2


def test_bench_tiny_runs_end_to_end_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--new-tokens", "12", "--decode-steps", "3", "--check-steps", "8", "--repeats", "1",
                     "--warmup", "0", "--no-compile", "--prompts", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["check"]["ok"] and result["check"]["steps"] == 8 and result["check"]["token_mismatches"] == 0
    assert result["shapes"]["group"] == 8 and result["shapes"]["new_tokens"] == 12 and result["shapes"]["prompt_length"] == 12 + 16
    assert result["copy_bandwidth_gbps"] > 0 and result["matmul_tflops"] > 0 and result["peak_memory_gb"] is None
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("encode video (SigLIP + connector)", "prefill, 1 x 28 tokens", "decode step, G=8, fast (compiled)",
                 "decode step, G=8, eager", "rollout 8 x 12 (prefill once + 12 steps)", "reference log-probs, 8 x 40 tokens",
                 "policy forward + backward, 8 x 40 tokens (checkpointed)", "AdamW step + sampler refresh, 257,408 fp32 parameters",
                 "GRPO step, 2 prompts, rollout batch 1", "GRPO step, 2 prompts, rollout batch 2"):
        assert rows[name]["ms"] > 0 and rows[name]["floor_ms"] > 0 and 0 < rows[name]["of_floor"], name
    assert result["hf"] == __import__("transformers").__version__  # the peers ran, on the same shapes
    peers = [r for r in result["rows"] if "HF generate" in r["name"]]
    assert len(peers) == 2 and all(r["ms"] > 0 for r in peers)
    fast = rows["decode step, G=8, fast (compiled)"]
    assert fast["peer"].startswith("HF generate") and fast["speedup"] == pytest.approx(fast["peer_ms"] / fast["ms"])
    printed = capsys.readouterr().out
    assert "GRPO step, 2 prompts, rollout batch 2" in printed and "speed-up" in printed and "check passed" in printed
    assert result["projected_nextqa_hours"] > 0


def test_fast_step_falls_back_to_eager_when_compiling_fails():
    """A machine where torch.compile cannot build (no C++ compiler) still trains: a warning, then eager."""
    model = tiny_model()
    lm = model.language_model
    ids, video = prompt(model)
    embeds, mask = model.embed(ids, video)
    fast = G.FastDecode(lm, compile=True)

    def broken(tokens, cache):
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

    fast.step = broken
    with torch.no_grad():
        caches = []
        for _ in range(2):
            cache = model.new_cache(1, embeds.shape[1] + 1)
            lm.model(embeds, mask, cache)
            caches.append(cache)
        with pytest.warns(UserWarning, match="no working C\\+\\+ compiler"):
            got = fast(torch.zeros(1, dtype=torch.long), caches[0])
        assert torch.equal(got, lm.decode_step(torch.zeros(1, dtype=torch.long), caches[1]))


def test_bf16_sampler_shares_the_tower_and_refreshes_in_place():
    """The GPU layout, run on the CPU: the sampler is a bf16 copy of connector + decoder (the vision
    tower shared, not copied) with a bf16 cache, and refresh() copies the policy in without moving
    a tensor (a captured CUDA graph keeps reading the same addresses)."""
    policy = tiny_model()
    sampler = G.Sampler(policy, torch.bfloat16)
    assert sampler.model.vision_tower is policy.vision_tower
    lm = sampler.model.language_model
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16 and policy.language_model.model.embed_tokens.weight.dtype == torch.float32
    addresses = [p.data_ptr() for p in sampler.model.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    sampler.refresh()
    assert [p.data_ptr() for p in sampler.model.parameters()] == addresses
    for (name, mine), master in zip(sampler.model.named_parameters(), policy.parameters()):
        assert torch.equal(mine, master.to(mine.dtype)), name
    ids, pixels = bench.inputs(policy.config, bench.TINY, torch.device("cpu"), seed=1)
    with torch.no_grad():
        r = sampler.rollout(ids, policy.vision_features(pixels), eos_id=-1, group_size=4, max_new_tokens=5, temperature=0)
    assert r.completion_ids.shape == (4, 5)
    assert sampler.model.new_cache(1, 4).k[0].dtype == torch.bfloat16
