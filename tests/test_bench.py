"""bench.py: its fast-vs-eager decode check catches a wrong step, and `bench.py --tiny` runs end to end, compiled
(so its check compares the compiled step with the eager one), and writes its table (on CPU: CUDA graphs are
exercised only by bench.py on a GPU)."""

import json

import pytest
import torch._dynamo.utils

import bench
from conftest import tiny_model, tiny_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_decode_check_catches_a_wrong_fast_step():
    model = tiny_model(size="tiny")
    lm = model.language_model
    ids, video = tiny_prompt(model)
    embeds, mask = model.embed(ids, video)

    def check(fast_step):
        return bench.check_decode(model, lm.decode_step, fast_step, embeds, mask, group=2, steps=6,
                                  max_len=embeds.shape[1] + 7, tol=1e-4)

    assert check(lm.decode_step)["ok"]
    off_by_one_position = lambda tokens, cache: (cache.next_pos.add_(1), lm.decode_step(tokens, cache))[1]
    bad = check(off_by_one_position)
    assert not bad["ok"] and bad["max_abs_logit_diff"] > 1e-2


@pytest.mark.slow  # compiles the decode step: ~20 s, ~60 s with a cold compile cache
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")  # no silent fallback to eager
def test_bench_tiny_runs_end_to_end_compiled_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    torch._dynamo.reset()  # a fresh budget of 8 recompilations: every earlier test's model counted against it
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rc = bench.main(["--tiny", "--new-tokens", "12", "--decode-steps", "3", "--check-steps", "8", "--repeats", "1",
                     "--warmup", "0", "--prompts", "2", "--json", str(out)])
    assert rc == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the fast step was compiled
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
