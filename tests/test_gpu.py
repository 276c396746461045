"""The single-GPU path, emulated on the CPU (tests/gpu_emulation.py): train.py's GRPO and SFT steps in the GPU layout
with a compiled sampler replayed as (fake) CUDA graphs give the eager run's metrics; a failed compile or capture falls
back to eager decoding on both branches; the stream and graph are made on the chosen device; the decode step compiles
once for a run whose rows leave the batch; a run resumes on another device."""

import gc
import json
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import bench
import grpo as G
import model as M
import weights as W
import parallel
import runs
import sample
import train
from conftest import tiny_model, tiny_prompt
from gpu_emulation import emulated_gpu  # noqa: F401 (a fixture)
from test_train import run, task  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def eos_task(task):  # noqa: F811
    """The tiny task from a start whose eos is likely at some steps, not at others: rows finish at different lengths."""
    init = os.path.join(os.path.dirname(task["init"]), "init_eos")
    if not os.path.exists(init):
        model = W.from_pretrained(task["init"], dtype=torch.float32)
        eos = train.data.Tokenizer(task["init"], model.config.text.vocab_size).eos_id
        with torch.no_grad():
            model.language_model.model.embed_tokens.weight[eos] *= 60
        W.save_pretrained(model, init)
        shutil.copy(os.path.join(task["init"], "tokenizer.json"), init)
    return {**task, "init": init}


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "tokens_per_s"}
            for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_emulated_gpu_grpo_and_sft_steps_equal_the_eager_run(eos_task, tmp_path, emulated_gpu, monkeypatch, capsys):  # noqa: F811
    copies = []
    monkeypatch.setattr(G, "frozen_copy", lambda m, dtype=None, real=G.frozen_copy: copies.append(dtype) or real(m, dtype))
    run(eos_task, tmp_path / "sft", stage="sft", steps=2)  # bf16 autocast on the CPU
    assert copies == []  # SFT builds no bf16 sampler (nor a reference)
    kw = dict(max_new_tokens=20, steps=3, prompts_per_step=4, micro_batch=4, lr=1e-3)
    run(eos_task, tmp_path / "bf16", compile=False, **{**kw, "steps": 1})
    assert copies == [torch.bfloat16, None]  # the bf16 sampler, then the reference
    # A GPU without bf16 runs in fp32 (the sampler is the policy); the compiled and captured step against the eager
    # one (inductor's bf16 rounds less often than eager bf16: equal tokens only in fp32).
    emulated_gpu.bf16 = False
    run(eos_task, tmp_path / "eager", compile=False, **kw)
    assert "no bf16" in capsys.readouterr().out and emulated_gpu.graphs == []
    compiled = counters["stats"]["unique_graphs"]
    run(eos_task, tmp_path / "fast", **kw)
    assert counters["stats"]["unique_graphs"] - compiled <= 2  # one compile, at most one recompile
    eager, fast = metrics(tmp_path / "eager"), metrics(tmp_path / "fast")
    assert fast == eager and len(eager) == 3
    lengths = [(r["completion_length_min"], r["completion_length_max"]) for r in eager]
    assert any(lo < 9 and hi > 16 for lo, hi in lengths), lengths  # rows left the batch: new caches, new graphs
    assert len(emulated_gpu.graphs) > 3 and emulated_gpu.replays > 20


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("where", ["compile", "warm-up", "capture"])
def test_a_failed_compile_or_capture_decodes_eagerly(where, emulated_gpu, monkeypatch):
    model = tiny_model(size="tiny")
    lm = model.language_model
    fast = G.FastDecode(lm, cuda_graph=where != "compile")

    def broken(*a, **k):
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

    if where == "capture":
        monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    else:
        fast.fns = {name: broken for name in fast.fns}
    ids, video = model.embed(*tiny_prompt(model))
    caches = [model.new_cache(1, ids.shape[1] + 4) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            lm.model(ids, video, c)
        with pytest.warns(UserWarning, match="decoding eagerly: RuntimeError: InductorError: no working C\\+\\+ compiler"):
            got = [fast(torch.tensor([t]), caches[0]) for t in range(3)]
        want = [lm.decode_step(torch.tensor([t]), caches[1]) for t in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and caches[0].length == caches[1].length
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + [caches[0].valid], caches[1].k + [caches[1].valid]))



def test_cuda_device_n_is_made_current_and_the_graph_is_made_there(emulated_gpu):
    rank, world, device = parallel.setup_distributed(SimpleNamespace(device="cuda:1", fsdp=False))
    assert (rank, world, device) == (0, 1, torch.device("cuda:1")) and emulated_gpu.set_devices == [torch.device("cuda:1")]
    model = tiny_model(size="tiny")
    fast = G.FastDecode(model.language_model, compile=False, cuda_graph=True)
    fast.fns = {k: torch.compile(f, backend="eager") for k, f in fast.fns.items()}  # recorded by the fake graph
    ids, video = tiny_prompt(model)
    embeds, mask = model.embed(ids, video)
    cache = model.new_cache(1, embeds.shape[1] + 3)
    with torch.no_grad():
        model.language_model.model(embeds, mask, cache)
        fast(torch.tensor([1]), cache)
    assert [s.device for s in emulated_gpu.streams] == [1, 1] and [g.device for g in emulated_gpu.graphs] == [1]


@pytest.mark.parametrize("bf16", [True, False])
def test_sample_load_makes_cuda_n_current_before_loading(ckpt, emulated_gpu, monkeypatch, capsys, bf16):
    emulated_gpu.bf16, loaded, load = bf16, [], W.from_pretrained
    monkeypatch.setattr(W, "from_pretrained", lambda path, device, dtype: loaded.append(
        (emulated_gpu.device, device, dtype)) or load(path, device="cpu", dtype=dtype))
    sample.load(ckpt, "cuda:1")
    assert loaded == [(1, torch.device("cuda:1"), torch.bfloat16 if bf16 else torch.float32)]
    assert ("no bf16" in capsys.readouterr().err) is not bf16


def test_resume_on_another_device_says_so(task, tmp_path, capsys):  # noqa: F811
    run(task, tmp_path / "run", steps=2, stop_after=1, compile=False)  # not about compiling
    ckpt = str(tmp_path / "run" / "checkpoint")
    state = runs.load_state(ckpt)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    runs.save_state(state, ckpt)
    capsys.readouterr()
    run(task, tmp_path / "run", steps=2, resume=True, compile=False)
    assert "sampling will not repeat" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_out_of_memory_halves_the_batch_and_goes_on(monkeypatch, capsys):
    asked = []

    def generate(model, tok, questions, pixels, *a, **k):
        if len(questions) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        asked.append(len(questions))
        return [f"<answer>{q}</answer>" for q in questions]

    monkeypatch.setattr(sample, "generate", generate)
    fits = {"batch": 8}
    got = sample.generate_fitting(fits, None, None, list("ABCDE"), torch.zeros(5), 4)
    got += sample.generate_fitting(fits, None, None, list("FGH"), torch.zeros(3), 4)
    assert got == [f"<answer>{q}</answer>" for q in "ABCDEFGH"] and asked == [2, 2, 1, 2, 1]
    assert capsys.readouterr().err.count("out of GPU memory") == 1


def prefill_peak_bytes(model, batch, L, S):
    """The most bytes live at once while `batch` questions of L tokens prefill into S cache slots, counted on the CPU
    by the profiler (each allocation and free is charged to the one operation that made it)."""
    text = model.config.text
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        cache = model.new_cache(batch, S)
        model.language_model.logits(model.language_model.model(torch.randn(batch, L, text.hidden_size),
                                                                torch.ones(batch, L, dtype=torch.bool), cache)[:, -1])
        del cache
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.end)
    live = torch.tensor([e.self_cpu_memory_usage for e in events]).cumsum(0)
    return int(live.max())


@pytest.mark.parametrize("L, new_tokens", [(200, 100), (400, 200), (20, 2000)])
def test_the_batch_size_estimate_counts_what_a_question_holds(L, new_tokens):
    model = tiny_model()
    measured = (prefill_peak_bytes(model, 5, L, L + new_tokens) - prefill_peak_bytes(model, 1, L, L + new_tokens)) / 4
    estimate = sample.question_bytes(model.config.text, L, L + new_tokens, 4)
    assert measured <= estimate <= 1.5 * measured, (measured, estimate)


def test_bench_frees_the_training_side_before_the_peers(monkeypatch, tmp_path):
    alive = []
    monkeypatch.setattr(bench, "hf_peers", lambda *a: alive.append(
        [o for o in gc.get_objects() if isinstance(o, (torch.optim.Optimizer, G.Sampler))]) or {})
    assert bench.main(["--tiny", "--new-tokens", "4", "--decode-steps", "2", "--check-steps", "2", "--repeats", "1",
                       "--warmup", "0", "--no-compile", "--prompts", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert alive == [[]]
