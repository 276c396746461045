"""bench.py: how long one GRPO step takes, against its floor and against Hugging Face.

    python bench.py              # the published shapes on CUDA: Qwen2.5-3B decoder, SigLIP, 16 frames,
                                 # 512 video tokens, G = 8 completions of 512 new tokens
    python bench.py --tiny       # tiny shapes: the same code end to end on a CPU, in seconds

A GRPO step for one prompt: encode the video once; sample G completions (prefill the prompt once, then one
decode step of the whole group per token); the completions' log-probs under the frozen reference; the policy's
forward and backward (fp32 master weights, bf16 compute, gradient checkpointing, vision tower frozen); an AdamW
step; copying the new weights into the bf16 sampler. Each phase is timed on its own, and the whole step end to
end, after checking the fast decode step against the eager one under greedy decoding. Weights are random (speed
does not depend on them) and eos id -1 is never sampled, so every run does the same work.

Each figure is compared with two things measured in the same run:
  - its floor: the time to move the bytes it must move at the device-to-device copy bandwidth, or to do its
    matrix-product FLOPs at the measured matmul rate. A decode step of the group reads every decoder weight
    once (6.2 GB for Qwen2.5-3B in bf16) plus its context's keys and values: about 2.1 ms on an H100.
    "of floor" is floor / time.
  - a peer: Hugging Face `generate` on the same decoder and weights, eager and with its static cache
    (compiled on CUDA), same batch and prompt length. "speed-up" is peer time / our time.
Timings are medians over --repeats runs after --warmup runs (CUDA events on CUDA, perf_counter on CPU), printed
and written as JSON (--json).
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import grpo
from model import TinyLLaVA, TinyLLaVAConfig, config as model_config
import train

NEVER = -1  # an eos id no token has: every completion runs to its full length


# ----------------------------------------------------------------------------- shapes, timing, floors

PUBLISHED = dict(frames=16, text_tokens=108, group=8, new_tokens=512, prompts=8, decode_steps=64, check_steps=32)
TINY = dict(frames=4, text_tokens=12, group=8, new_tokens=64, prompts=8, decode_steps=16, check_steps=24)
NEXTQA_STEPS = 687  # the paper's GRPO run: 5,496 NextQA prompts, 8 per step


def inputs(config, shapes, device, seed):
    """One prompt: text ids with the video placeholder, and random frames in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.text.vocab_size, (1, shapes["text_tokens"] + 1), generator=g)
    ids[0, shapes["text_tokens"] // 3] = config.image_token_index  # after the system sentence and "USER:"
    pixels = torch.rand(1, shapes["frames"], 3, *[config.vision.image_size] * 2, generator=g) * 2 - 1
    return ids.to(device), pixels.to(device)


def log(msg):
    print(f"[bench] {msg}", flush=True)


class Clock:
    """Marks on the device's timeline: CUDA events on CUDA (the GPU's time, host gaps included), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b):  # once the device is synchronized
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn, *args):
        """Milliseconds of one fn(*args), the device idle before and after."""
        self.sync()
        start = self.mark()
        fn(*args)
        end = self.mark()
        self.sync()
        return self.ms(start, end)


def timed(clock, fn, setup=lambda: (), warmup=1, repeats=3):
    """Median milliseconds of fn(*setup()) over `repeats` runs, after `warmup` runs; setup is not timed."""
    return statistics.median([clock.once(fn, *setup()) for _ in range(warmup + repeats)][warmup:])


def copy_bandwidth(clock, device):
    """Bytes moved per second by a device-to-device copy (read + write)."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / (timed(clock, lambda: dst.copy_(src), warmup=2, repeats=5) / 1e3)


def matmul_rate(clock, device, dtype):
    """FLOP/s of one large matrix product in `dtype`."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (timed(clock, lambda: a @ b, warmup=2, repeats=5) / 1e3)


def count_flops(fn):
    """Matrix-product and attention FLOPs of one call of fn (forward, and backward if fn runs it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- correctness first

@torch.no_grad()
def check_decode(model, eager_step, fast_step, embeds, mask, group, steps, max_len, tol):
    """The fast decode step against the eager one under greedy decoding, both fed the eager argmax from
    caches prefilled alike (of the rollouts' size: the compiled step is the rollouts'). They must pick
    the same token at every step but near-ties (eager top-2 gap within twice the logit difference:
    rounding may flip those), and their logits agree within `tol` of the logits' scale."""
    lm = model.language_model
    caches = []
    for _ in range(2):
        cache = model.new_cache(1, max_len)
        last = lm.logits(lm.model(embeds, mask, cache)[:, -1])
        caches.append(cache.repeat_interleave(group))
    tok = last.argmax(-1).repeat(group)
    worst, scale, flips, ties = 0.0, 0.0, 0, 0
    for _ in range(steps):
        a, b = eager_step(tok, caches[0]).float(), fast_step(tok, caches[1]).float()
        diff = (a - b).abs().amax(-1)  # (G,)
        top2 = a.topk(2, dim=-1).values
        near_tie = top2[:, 0] - top2[:, 1] <= 2 * diff
        differ = a.argmax(-1) != b.argmax(-1)
        flips += int((differ & ~near_tie).sum())
        ties += int((differ & near_tie).sum())
        worst, scale = max(worst, diff.max().item()), max(scale, a.abs().max().item())
        tok = a.argmax(-1)
    ok = flips == 0 and worst <= tol * scale
    return dict(ok=ok, steps=steps, group=group, max_abs_logit_diff=worst, logit_scale=scale, tolerance=tol,
                token_mismatches=flips, near_tie_mismatches=ties)


# ----------------------------------------------------------------------------- Hugging Face peers

def hf_peers(lm, clock, embeds, group, new_tokens):
    """transformers' Qwen2ForCausalLM with our decoder's config and weights (same names), its greedy `generate`
    of `group` rows from the same prompt embeddings forced to `new_tokens`, eager and with its static cache
    (compiled on CUDA) -> {name: (total ms including its prefill, ms per decode step)}, the step from a mark
    at every step's logits."""
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**dataclasses.asdict(lm.cfg), attn_implementation="sdpa")  # the same field names
    with torch.device(embeds.device):
        hf = Qwen2ForCausalLM(config).to(embeds.dtype).eval().requires_grad_(False)
    missing, unexpected = hf.load_state_dict(lm.state_dict(), strict=False)  # a tied lm_head is tied by transformers
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"bench.py: our decoder's keys do not match transformers' Qwen2: "
                           f"missing {missing}, unexpected {unexpected}")

    class StepMarks(list, LogitsProcessor):  # called once per step with that step's logits: a mark of the clock
        def __call__(self, input_ids, scores):
            self.append(clock.mark())
            return scores

    rows, peers = embeds.expand(group, -1, -1), {}
    for name, static in (("HF generate, eager", False), ("HF generate, static cache", True)):
        name += " + compile" if static and clock.cuda else ""
        log(f"{name}: {group} x {new_tokens} tokens" + (" (the first run compiles)" if static and clock.cuda else ""))
        kw = dict(inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2], dtype=torch.long, device=rows.device),
                  do_sample=False, eos_token_id=0, pad_token_id=0, cache_implementation="static" if static else None)

        @torch.no_grad()
        def run(n, marks=()):  # min_new_tokens: exactly n tokens
            hf.generate(max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList(marks), **kw)

        run(new_tokens if static else 4)  # a static cache is sized by prompt + new tokens: warm up at full length
        steps = StepMarks()
        total = clock.once(run, new_tokens, [steps])
        peers[name] = total, clock.ms(steps[0], steps[-1]) / (len(steps) - 1)
        log(f"{name}: {total:.0f} ms in all, {peers[name][1]:.2f} ms per step")
    return peers


# ----------------------------------------------------------------------------- the benchmark

# One H100, published shapes, G = 8, 512 new tokens: the decode step near its 2.1 ms floor, a GRPO
# step of 8 prompts in 15 s (the 687-step NextQA run in under 3 hours), all of it within 80 GB.
TARGETS = dict(decode_ms=3.0, decode_of_floor=0.70, decode_speedup=2.5, grpo_step_ms_per_prompt=4000.0,
               grpo_step_ms=15000.0, nextqa_hours=3.0, peak_memory_gb=80.0)


class Bench:
    """One run's shapes, clock, floors and figures; run() calls its phases below in order."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = cuda = self.device.type == "cuda"
        defaults = TINY if args.tiny else PUBLISHED
        self.shapes = shapes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
        self.G, self.T = shapes["group"], shapes["new_tokens"]
        self.dtype = dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.clock = Clock(self.device)
        self.config = model_config("tiny") if args.tiny else TinyLLaVAConfig()
        threads = torch.get_num_threads()
        cpu = f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"
        self.result = result = dict(command="python " + " ".join(["bench.py"] + args.argv),
                                    device=torch.cuda.get_device_name(self.device) if cuda else cpu, torch=torch.__version__,
                                    dtype=str(dtype).replace("torch.", ""), shapes=shapes)
        self.measured = {}  # name -> (ms, floor ms, what bounds the floor)
        log(f"device {result['device']}, {'tiny' if args.tiny else 'published'} shapes {shapes}, {result['dtype']}")
        if not cuda and not args.tiny:
            log("the published shapes are far too slow for a CPU: --tiny is meant for CPUs")
        self.bandwidth, self.flop_rate = copy_bandwidth(self.clock, self.device), matmul_rate(self.clock, self.device, dtype)
        result.update(copy_bandwidth_gbps=self.bandwidth / 1e9, matmul_tflops=self.flop_rate / 1e12)
        log(f"copy bandwidth {self.bandwidth / 1e9:.1f} GB/s, {result['dtype']} matmul {self.flop_rate / 1e12:.2f} TFLOP/s")

    def time_it(self, name, fn, setup=lambda: (), per=1, floor_ms=None, bound="compute"):
        ms = timed(self.clock, fn, setup, warmup=self.args.warmup, repeats=self.args.repeats) / per
        if floor_ms is None:  # FLOP-bound: its matrix-product FLOPs at the measured rate
            floor_ms = count_flops(fn) / self.flop_rate * 1e3
        self.measured[name] = (ms, floor_ms, bound)
        log(f"{name}: {ms:.2f} ms (floor {floor_ms:.3f} ms)")
        return ms, floor_ms

    def build(self):
        """The policy (fp32, connector and decoder trained), the sampler (a `dtype` copy that decodes the
        rollouts) and the frozen reference, as train.py builds them; the prompt embedded; the decode floor."""
        log("building the policy (fp32), the sampler and the reference")
        args, device, dtype = self.args, self.device, self.dtype
        torch.manual_seed(args.seed)
        with torch.device(device):
            self.policy = policy = TinyLLaVA(self.config)
        train.freeze_vision(policy)
        policy.language_model.model.gradient_checkpointing = True
        self.sampler = sampler = grpo.Sampler(policy, dtype, compile=not args.no_compile)
        self.reference = grpo.frozen_copy(policy, dtype)
        policy.train()
        self.ids, self.pixels = inputs(self.config, self.shapes, device, args.seed)
        self.model, self.lm = model, lm = sampler.model, sampler.model.language_model
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-6, fused=self.cuda)
        self.gen = torch.Generator(device).manual_seed(args.seed)
        with torch.no_grad():
            self.features = model.vision_features(self.pixels)  # the tower is frozen: computed once, used by all three models
            self.embeds, self.mask = model.embed(self.ids, model.connect(self.features))
        L = self.L = self.result["shapes"]["prompt_length"] = self.embeds.shape[1]
        decoder_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        c = self.config.text
        kv_bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize
        # A step reads every decoder weight once, and the keys and values of a context of L..L+T tokens.
        self.step_floor = (decoder_bytes + self.G * kv_bytes_per_token * (L + self.T / 2)) / self.bandwidth * 1e3
        self.result.update(decoder_gb=decoder_bytes / 1e9, kv_bytes_per_token=kv_bytes_per_token, decode_floor_ms=self.step_floor)

    def time_sampler(self):
        """Encode, prefill, the decode step (fast, eager), a rollout; False if fast and eager disagree."""
        model, lm, reference, pixels, embeds, mask = self.model, self.lm, self.reference, self.pixels, self.embeds, self.mask
        G, T, L, dtype, flop_rate = self.G, self.T, self.L, self.dtype, self.flop_rate

        @torch.no_grad()
        def encode():
            model.connect(model.vision_features(pixels))

        @torch.no_grad()
        def prefill():
            cache = model.new_cache(1, L + T)
            lm.logits(lm.model(embeds, mask, cache)[:, -1])
            return cache

        # FLOPs counted on the reference, of the same shapes: on a CPU the sampler is the policy itself,
        # and the FLOP counter's module hooks fail on parameters that need a gradient under no_grad.
        with torch.no_grad():
            encode_flops = count_flops(lambda: reference.connect(reference.vision_features(pixels)))
            prefill_flops = count_flops(lambda: reference.language_model.model(embeds.to(dtype), mask))
        self.time_it("encode video (SigLIP + connector)", encode, floor_ms=encode_flops / flop_rate * 1e3)
        _, prefill_floor = self.time_it(f"prefill, 1 x {L} tokens", prefill, floor_ms=prefill_flops / flop_rate * 1e3)

        # The sampler's step is what rollouts run: compiled unless --no-compile; the eager step is the oracle.
        eager_step = lm.decode_step
        fast_step = self.sampler.decode if not self.args.no_compile else grpo.FastDecode(lm, compile=False)
        steps = min(self.shapes["check_steps"], T - 1)
        log(f"checking the fast decode step against the eager one over {steps} greedy steps"
            + ("" if self.args.no_compile else " (the first step compiles)"))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        self.result["check"] = check = check_decode(model, eager_step, fast_step, embeds, mask, G, steps, L + T, tol)
        log(f"check {'passed' if check['ok'] else 'FAILED'}: {check}")
        if not check["ok"]:
            return False
        n = self.shapes["decode_steps"]

        @torch.no_grad()
        def group_cache(step):  # a prefilled group cache, one step taken (on CUDA that step captures the graph)
            cache, tok = prefill().repeat_interleave(G), torch.zeros(G, dtype=torch.long, device=self.device)
            step(tok, cache)
            return tok, cache

        @torch.no_grad()
        def n_steps(step, tok, cache):
            for _ in range(n):
                step(tok, cache)

        self.fast_name = f"decode step, G={G}, fast (compiled{' + CUDA graph' if self.cuda else ''})"
        self.eager_name = f"decode step, G={G}, eager"
        for name, step in ((self.fast_name, fast_step), (self.eager_name, eager_step)):
            self.time_it(name, partial(n_steps, step), partial(group_cache, step), per=n, floor_ms=self.step_floor, bound="memory")
        self.sampler.decode = fast_step

        self.sample = partial(self.sampler.rollout, self.ids, self.features, NEVER, pad_id=0, group_size=G, max_new_tokens=T,
                              generator=self.gen)
        self.rollout_name = f"rollout {G} x {T} (prefill once + {T} steps)"
        self.time_it(self.rollout_name, self.sample, floor_ms=prefill_floor + T * self.step_floor, bound="memory")
        return True

    def time_training(self):
        """The training side phase by phase: reference log-probs, the policy's forward and backward, AdamW."""
        policy, reference, ids, features, G, L, T = self.policy, self.reference, self.ids, self.features, self.G, self.L, self.T
        r = self.sample()
        advantages = grpo.group_advantages(torch.randn(G, device=self.device, generator=self.gen), G)  # no tokenizer: random rewards

        @torch.no_grad()
        def reference_logprobs():
            with self.autocast:
                return grpo.completion_logprobs(reference, ids, reference.connect(features), r.completion_ids, r.mask)

        ref_logp = reference_logprobs()

        def policy_backward():
            with self.autocast:
                logp = grpo.completion_logprobs(policy, ids, policy.connect(features), r.completion_ids, r.mask)
            loss, _ = grpo.grpo_loss(logp, None, ref_logp, advantages, r.mask)
            loss.backward()

        self.optimizer_step = optimizer_step = partial(train.optimizer_step, self.optimizer, self.trainable, self.sampler,
                                                       max_grad_norm=1.0)
        n_train = sum(p.numel() for p in self.trainable)
        self.time_it(f"reference log-probs, {G} x {L + T} tokens", reference_logprobs)
        self.time_it(f"policy forward + backward, {G} x {L + T} tokens (checkpointed)", policy_backward)
        # AdamW reads parameters, gradients and both moments, and writes all but the gradients: 28 bytes each.
        adamw_bytes = (28 + (self.dtype.itemsize + 4 if self.sampler.model is not policy else 0)) * n_train
        self.time_it(f"AdamW step + sampler refresh, {n_train:,} fp32 parameters", lambda _: optimizer_step(),
                     setup=lambda: (policy_backward(),), floor_ms=adamw_bytes / self.bandwidth * 1e3, bound="memory")

    def time_grpo_step(self):
        """The whole step: train.py's own collect + update, with rollout batch 1 and all prompts at once."""
        P, G, T, ids, pixels, optimizer_step = self.shapes["prompts"], self.G, self.T, self.ids, self.pixels, self.optimizer_step
        phases = [name for name in self.measured if not name.startswith(("prefill", "decode"))]  # the rollout holds the prefill
        # What train.collect reads from the data side, without files: one fixed prompt for every sample, its video
        # in memory, completions never decoded (equal rewards: the advantages are the noise alone).
        prompt, video = ids[0].tolist(), pixels.cpu()
        tok = SimpleNamespace(eos_id=NEVER, pad_id=0, prompt_ids=lambda question, max_len: prompt, decode=lambda c: "")
        load = lambda batch: (batch, video.expand(len(batch), *video.shape[1:]))  # noqa: E731
        samples = [SimpleNamespace(question="", solution="A") for _ in range(P)]
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        step_ms, rollout_floor = [], P * sum(self.measured[k][1] for k in phases if k.startswith(("encode", "rollout")))
        for rb in sorted({1, P}):
            cfg = train.TrainConfig(stage="grpo", group_size=G, max_new_tokens=T, prompts_per_step=P, micro_batch=1,
                                    rollout_batch=rb, max_len=10**6)
            rollout_ms = []  # the step's own clock of its rollout phase (videos encoded, rollouts, rewards)

            def grpo_step(cfg=cfg, rollout_ms=rollout_ms):
                metrics = train.grpo_step(self.policy, self.sampler, self.reference, tok, samples, load, cfg, self.device,
                                          self.gen, optimizer_step)
                rollout_ms.append(metrics["time/rollout"] * 1e3)
                optimizer_step()

            step_ms.append(self.time_it(f"GRPO step, {P} prompts, rollout batch {rb}", grpo_step,
                                        floor_ms=P * sum(self.measured[k][1] for k in phases), bound="sum of phases")[0])
            name = f"  its rollout phase ({P * G} rows, {rb * G} at a time)"
            self.measured[name] = (statistics.median(rollout_ms[self.args.warmup:]), rollout_floor, "sum of phases")
            log(f"{name.strip()}: {self.measured[name][0]:.2f} ms")
        self.result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None
        self.best_step = min(step_ms)
        hours = self.result["projected_nextqa_hours"] = NEXTQA_STEPS * self.best_step / 3.6e6
        log(f"the paper's GRPO run, {NEXTQA_STEPS} steps of {P} prompts at {self.best_step / 1e3:.2f} s: {hours:.2f} h")

    def time_peers(self):
        """HF generate on the same decoder, once the training side is gone: name -> (ms in all, ms per step)."""
        del self.policy, self.reference, self.optimizer, self.trainable, self.sampler, self.sample, self.optimizer_step
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self.hf_T = self.args.hf_new_tokens or self.T
        try:
            import transformers
            self.result["hf"] = "skipped (--no-hf)" if self.args.no_hf else transformers.__version__
        except ImportError:
            self.result["hf"] = "transformers is not installed"
        run = not self.args.no_hf and "transformers" in sys.modules
        return hf_peers(self.lm, self.clock, self.embeds.to(self.dtype), self.G, self.hf_T) if run else {}

    def report(self, peers):
        """The rows of the table, each beside its floor and its peer, and the targets (published shapes)."""
        G, T, result, measured = self.G, self.T, self.result, self.measured

        def row(name, ms, floor_ms, bound, peer=None, peer_ms=None):
            return dict(name=name, ms=ms, floor_ms=floor_ms, bound=bound, of_floor=floor_ms / ms, peer=peer,
                        peer_ms=peer_ms, speedup=peer_ms / ms if peer_ms else None)

        best = min(peers, key=lambda k: peers[k][1]) if peers else None
        # the best peer beside our decode step and our rollout (its time scaled if the peers made fewer tokens)
        peer_of = {self.fast_name: (best, peers[best][1]), self.rollout_name: (best, peers[best][0] * T / self.hf_T)} if best else {}
        result["rows"] = rows = []
        for name, (ms, floor_ms, bound) in measured.items():
            rows.append(row(name, ms, floor_ms, bound, *peer_of.get(name, ())))
            if name == self.eager_name:  # the peers' own decode steps, right below ours
                rows += [row(f"decode step, G={G}, {p}", ms, self.step_floor, "memory") for p, (_, ms) in peers.items()]
        if not self.args.tiny:
            fast_ms, fast_floor = measured[self.fast_name][:2]
            got = dict(decode_ms=fast_ms, decode_of_floor=fast_floor / fast_ms,
                       decode_speedup=peer_of[self.fast_name][1] / fast_ms if best else None,
                       grpo_step_ms_per_prompt=self.best_step / self.shapes["prompts"], grpo_step_ms=self.best_step,
                       nextqa_hours=result["projected_nextqa_hours"], peak_memory_gb=result["peak_memory_gb"])
            higher = ("decode_of_floor", "decode_speedup")  # the other targets are upper bounds
            result["targets"] = {k: dict(target=v, measured=got[k], met=None if got[k] is None else
                                         (got[k] >= v if k in higher else got[k] <= v)) for k, v in TARGETS.items()}


def run(args):
    bench = Bench(args)
    bench.build()
    if bench.time_sampler():  # else the fast decode step disagrees with the eager one: nothing more is timed
        bench.time_training()
        bench.time_grpo_step()
        bench.report(bench.time_peers())
    return bench.result


# ----------------------------------------------------------------------------- the report

def table(result):
    lines = [f"{result['device']}, torch {result['torch']}, {result['dtype']}, shapes {result['shapes']}",
             f"copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s, matmul {result['matmul_tflops']:.2f} TFLOP/s",
             "", f"{'phase':<58} {'ms':>10} {'floor ms':>10} {'of floor':>9}  {'peer':<34} {'peer ms':>10} {'speed-up':>8}"]
    cell = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['name']:<58} {cell(r['ms'], '10.2f')} {cell(r['floor_ms'], '10.3f'):>10} "
                     f"{cell(r['of_floor'] and 100 * r['of_floor'], '8.1f') + ('%' if r['of_floor'] else ''):>9}  "
                     f"{r['peer'] or '-':<34} {cell(r['peer_ms'], '10.2f'):>10} {cell(r['speedup'], '7.2f') + ('x' if r['speedup'] else ''):>8}")
    if result.get("peak_memory_gb") is not None:
        lines.append(f"peak memory {result['peak_memory_gb']:.1f} GB (policy + gradients + AdamW state, sampler, reference)")
    lines.append(f"decode check, fast vs eager under greedy: {result['check']}")
    for name, t in result.get("targets", {}).items():
        lines.append(f"target {name}: {t['target']}, measured {t['measured']}, {'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Shape flags default to the published shapes, or to small ones with --tiny: "
                                       f"published {PUBLISHED}, tiny {TINY}.")
    p.add_argument("--tiny", action="store_true", help="tiny model and inputs (for a CPU and for the tests)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if there is one")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="compute dtype of the sampler and the reference, and autocast "
                   "dtype of the fp32 policy (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--frames", type=int, help="video frames per prompt")
    p.add_argument("--text-tokens", type=int, help="prompt tokens besides the video's")
    p.add_argument("--group", type=int, help="completions per prompt (G)")
    p.add_argument("--new-tokens", type=int, help="tokens per completion; every completion runs to this length")
    p.add_argument("--prompts", type=int, help="prompts per GRPO step (timed with rollout batch 1 and all of them)")
    p.add_argument("--decode-steps", type=int, help="decode steps per timing of the bare decode step")
    p.add_argument("--check-steps", type=int, help="greedy steps of the fast-vs-eager decode check")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    p.add_argument("--no-compile", action="store_true", help="fast decode without torch.compile (a CUDA graph of the eager kernels on CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peers")
    p.add_argument("--hf-new-tokens", type=int, help="tokens per completion for the peers (default: --new-tokens)")
    p.add_argument("--json", default="out/bench.json", help="where to write the results (default out/bench.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and samples (default 0)")
    p.set_defaults(argv=list(argv))  # the command, written into the results
    return p.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if not result["check"]["ok"]:
        log(f"the fast decode step disagrees with the eager one: nothing timed. {result['check']}")
        return 1
    print(table(result), flush=True)
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
