"""GRPO, the way TinyLLaVA-Video-R1 trains: rewards, advantages, rollouts, log-probs, loss, metrics.

The recipe (the paper's code; every default below is it). For each prompt, a video and a
multiple-choice question:

  1. Rollout. Sample G = 8 completions from the current model: temperature 1.0, top-k 50, up to 512
     new tokens. The video is encoded and the prompt prefilled once, its KV cache copied to the G
     rows; then all rows of all prompts decode together, one token per step.
  2. Rewards, from the text alone (decoded without special tokens, stripped):
       accuracy: 1 if the text inside the first <answer></answer> (else the whole completion) equals
                 the solution's, or begins with it ("B. sit down" matches "B"); else 0.
       format:   0 unless the completion is exactly <think>...</think> <answer>...</answer>, one of
                 each tag; then 0.5 + 0.5 * min(len(thinking) / 1200, 1).
       reward:   acc + (2 acc - 1) * fmt, and 0 (wrong, no format) becomes -2: correct answers get
                 1..2 (longer thinking, more), wrong ones in format -0.5..-1 (longer thinking, less).
  3. Advantages within the group: A = (r - group mean) / (unbiased group std + 1e-4), plus Gaussian
     noise of std 0.02, so a group whose rewards all agree still moves a little.
  4. Log-probs of the completion tokens under the policy (with grad) and under the reference, the
     frozen starting model (no grad), both seeing the same prompt and video.
  5. Loss per token: -(ratio * A) + beta * KL, ratio = exp(logp - logp.detach()) = 1, the k3 KL
     estimator exp(ref - logp) - (ref - logp) - 1, beta = 0.01; tokens after the first eos masked;
     averaged over each completion's tokens, then over completions. One optimiser step per rollout:
     the gradient is the policy gradient -A * grad(logp) plus the KL's pull towards the reference.

The logged loss hovers near 0 by construction (ratio 1, a group's advantages sum to about 0): it is
about beta * KL whatever the model learns, yet its gradient is not 0. Follow reward, accuracy and kl.

Pitfalls seen in other implementations, and how this file avoids them:
  - The reference model must see the video: `completion_logprobs` takes `video_embeds` for any model.
  - Thinking and answers span lines: every regex matches newlines (re.DOTALL).
  - The KL is a penalty: added to the loss, not subtracted.
  - Rollouts must use a KV cache: `rollout` always decodes through `decode_step` with one, all prompts
    and samples in one batch (peers made G batch-1 `generate` calls in training mode with gradient
    checkpointing, which silently turned the cache off).
  - (N, T, vocab) fp32 logits of a group are gigabytes: log-probs are taken a chunk of positions at
    a time, recomputed in backward.

Variants, one argument away (TRL's names and definitions): several updates per rollout (`old_logp`
to `grpo_loss`: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high] as in PPO); `loss_type`
"bnpo", "dr_grpo", "dapo"; `group_advantages(scale="batch" | "none")`; masking truncated completions
(`truncated=`) or groups whose rewards are all equal (`zero_variance_groups`); T-GRPO (Video-R1):
roll out again on shuffled frames (`shuffle_frames`) and add 0.3 to the correct ordered answers of a
prompt whose ordered accuracy is >= 0.8 x its shuffled accuracy (`temporal_bonus`).

Simplifications and deviations, in plain words:
  - Accuracy is string matching only (the answers here are option letters); its answer regex spans
    lines, where the original's did not (an answer split over lines scored 0 there).
  - Log-probs come from logits / temperature over the whole vocabulary: top-k and top-p only decide
    what is sampled (at the recipe's temperature 1 this is the model's own distribution).
  - "dapo" divides by the valid tokens of this one call, TRL's by those of the global batch: in one
    process with the whole batch in one call the two agree, so "dapo" equals "bnpo" here.
  - "grpo" with masked rows still averages over all N completions, the masked ones adding 0, as TRL
    does: masking shrinks the step rather than reweighting the rest.
  - The advantage noise is added whatever `scale` is; TRL adds none (noise_std=0 matches it).
  - T-GRPO: the bonus is added to the combined reward (Video-R1 adds it to its accuracy reward);
    "correct" means accuracy > 0; the shuffled rollouts only decide the bonus, never trained on.
  - reward_std in the metrics is the mean of the groups' stds (what TRL logs), not the batch's std.
"""

import copy
import re
import warnings
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- rewards
# A reward function is anything (completion: str, solution: str) -> float; `score` adds extra ones. The paper's
# three below: step 2 of the recipe above.

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>.*?</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
THINK_CHARS_FOR_FULL_FORMAT = 1200


def _answer(text):
    """The stripped text inside the first <answer></answer>, or the whole stripped text."""
    m = ANSWER.search(text)
    return (m.group(1) if m else text).strip()


def accuracy_reward(completion, solution):
    """1.0 if the answer equals the solution's or its first character does ("B. sit down", "B"), case-sensitive."""
    answer, truth = _answer(completion), _answer(solution)
    return 1.0 if answer == truth or (answer and truth == answer[0]) else 0.0


def format_reward(completion):
    text = completion.strip()
    m = FORMAT.fullmatch(text)
    if m is None or any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    return 0.5 + 0.5 * min(len(m.group(1).strip()) / THINK_CHARS_FOR_FULL_FORMAT, 1.0)


def combined_reward(acc, fmt):
    r = acc + (2 * acc - 1) * fmt
    return -2.0 if r == 0 else float(r)


def score(completions, solutions, reward_fns=None):
    """Rewards of N completions, `solutions` repeated once per completion -> float tensors (N,): "reward" (the paper's
    plus every extra), "accuracy", "format", and one per name of `reward_fns` (name -> fn(completion, solution))."""
    if len(completions) != len(solutions):
        raise ValueError(f"score: {len(completions)} completions but {len(solutions)} solutions "
                         "(repeat each prompt's solution once per completion)")
    extra = dict(reward_fns or {})
    clash = sorted(set(extra) & {"reward", "accuracy", "format"})
    if clash:
        raise ValueError(f"score: reward_fns may not be named {clash}: those names are taken")
    acc = [accuracy_reward(c, s) for c, s in zip(completions, solutions)]
    fmt = [format_reward(c) for c in completions]
    out = {"reward": torch.tensor([combined_reward(a, f) for a, f in zip(acc, fmt)]),
           "accuracy": torch.tensor(acc), "format": torch.tensor(fmt)}
    for name, fn in extra.items():
        out[name] = torch.tensor([float(fn(c, s)) for c, s in zip(completions, solutions)])
        out["reward"] = out["reward"] + out[name]
    return out


# ----------------------------------------------------------------------------- advantages


def _groups(x, group_size, what):
    """(N,) -> (N / G, G), rows prompt-major, with a clear error when N is not a multiple of G."""
    if group_size < 2:
        raise ValueError(f"{what}: group_size must be >= 2 (a group compares its samples), got {group_size}")
    if x.ndim != 1 or x.shape[0] % group_size:
        raise ValueError(f"{what}: expected (N,) values with N a multiple of group_size {group_size}, "
                         f"got shape {tuple(x.shape)}")
    return x.view(-1, group_size)


def group_advantages(rewards, group_size, noise_std=0.02, scale="group", generator=None):
    """rewards (N,) -> (r - group mean) / (std + 1e-4) + N(0, noise_std^2), (N,). scale "group": each
    group's unbiased std (the paper); "batch": the batch's; "none": no division (Dr. GRPO)."""
    r = _groups(rewards.float(), group_size, "group_advantages")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = r - r.mean(1, keepdim=True)
    if scale != "none":
        adv = adv / ((r.std(1, keepdim=True) if scale == "group" else r.std()) + 1e-4)
    adv = adv.flatten()
    if noise_std:
        device = adv.device if generator is None else generator.device  # draw where the generator lives
        adv = adv + noise_std * torch.randn(adv.shape, generator=generator, device=device).to(adv.device)
    return adv


def zero_variance_groups(rewards, group_size):
    """(N,) -> bool (N,), True on every row of a group whose rewards are all equal (no signal but noise)."""
    r = _groups(rewards, group_size, "zero_variance_groups")
    return (r == r[:, :1]).all(1).repeat_interleave(group_size)


def shuffle_frames(pixel_values, generator=None):
    """(B, T, 3, H, W) -> the same frames in a random order, a different permutation per row (T-GRPO)."""
    B, T = pixel_values.shape[:2]
    order = torch.stack([torch.randperm(T, generator=generator, device=getattr(generator, "device", "cpu"))
                         for _ in range(B)])
    rows = torch.arange(B, device=pixel_values.device)[:, None]
    return pixel_values[rows, order.to(pixel_values.device)]


def temporal_bonus(acc_ordered, acc_shuffled, group_size, bonus=0.3, ratio=0.8):
    """T-GRPO: accuracies (P*G,) on ordered frames and (P*G',) on shuffled ones, prompt-major -> (P*G,)
    `bonus` on the correct ordered completions of each prompt whose mean ordered accuracy is >= ratio
    * its mean shuffled accuracy, 0 elsewhere."""
    ordered = _groups(acc_ordered.float(), group_size, "temporal_bonus")
    P = ordered.shape[0]
    if acc_shuffled.ndim != 1 or acc_shuffled.shape[0] % P:
        raise ValueError(f"temporal_bonus: acc_shuffled must be (P*G',) for the same {P} prompts, "
                         f"got shape {tuple(acc_shuffled.shape)}")
    shuffled = acc_shuffled.float().view(P, -1).to(ordered.device)
    earned = ordered.mean(1, keepdim=True) >= ratio * shuffled.mean(1, keepdim=True)  # (P, 1)
    return (bonus * (earned & (ordered > 0)).float()).flatten()


# ----------------------------------------------------------------------------- rollouts and log-probs


@dataclass
class Rollout:
    """G completions per prompt, rows prompt-major (row p*G + g is sample g of prompt p)."""
    completion_ids: torch.Tensor  # (N, T) sampled tokens; pad after each row's eos
    mask: torch.Tensor  # (N, T) float, 1 up to and including the first eos
    logprobs: torch.Tensor  # (N, T) log-probs of the sampled tokens under the sampling policy
    truncated: torch.Tensor  # (N,) bool, True where no eos came within max_new_tokens
    group_size: int


def _mix32(x):
    """The "lowbias32" hash, a bijection on 32-bit ints held in int64; multipliers split in 16-bit
    halves so that no product leaves int64."""
    x = x & 0xFFFFFFFF
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (mult & 0xFFFF) + (((x * (mult >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sample_token(logits, temperature=1.0, top_k=50, top_p=1.0, generator=None, keys=None):
    """logits (N, V) -> tokens (N,) and their log-probs under logits / temperature (top-k and top-p only cut
    the tail sampled from); temperature 0 is greedy. Gumbel-max: argmax(logit + Gumbel noise) over the kept
    tokens samples exactly softmax(kept logits). Row n's noise for token v is a hash of (keys[n], v), so a
    row's sample never depends on which rows share the batch: a rollout samples the same completions whether
    its prompts decode together or apart, finished rows dropped or not. keys (N,) ints; None: from `generator`."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    logits = logits / temperature
    logp = logits.log_softmax(-1)
    k = top_k if top_k and top_k < logits.shape[-1] else logits.shape[-1]
    cand, index = logits.topk(k, dim=-1)  # (N, k), sorted: only these are hashed
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        probs = cand.softmax(-1)
        cand = cand.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))
    if keys is None:
        device = "cpu" if generator is None else generator.device
        keys = torch.randint(0, 2**31, (logits.shape[0],), generator=generator, device=device).to(logits.device)
    bits = _mix32(_mix32(keys[:, None] ^ index) ^ keys[:, None])  # (N, k) 32 random bits per candidate
    u = ((bits >> 8).float() + 0.5) / 2**24  # uniform in (0, 1)
    tok = index.gather(1, (cand - (-u.log()).log()).argmax(-1, keepdim=True))[:, 0]
    return tok, logp.gather(1, tok[:, None])[:, 0]


def pick_tokens(logits, done, seeds, t, eos_id, pad_id, temperature=1.0, top_k=50, top_p=1.0):
    """The per-row bookkeeping of a decode step, on the device: logits (rows, V) -> the next tokens, their log-probs
    and done (rows,), a finished row getting pad_id and 0. Step t's draws are keyed by (seeds (rows,), t (0-d))."""
    tok, lp = sample_token(logits, temperature, top_k, top_p, keys=_mix32(seeds ^ _mix32(t + 0x5EED)))
    return torch.where(done, pad_id, tok), torch.where(done, 0.0, lp), done | (tok == eos_id)


def token_step(step_logits, tok, cache, done, seeds, t, **sampling):
    """One decode step of the rows in the batch (tensors in, tensors out: what FastDecode compiles and captures):
    feed the last tokens (pad where finished), then `pick_tokens`."""
    return pick_tokens(step_logits(torch.where(done, sampling["pad_id"], tok), cache), done, seeds, t, **sampling)


@torch.no_grad()
def rollout(model, input_ids, video_embeds, eos_id, pad_id=None, attention_mask=None, group_size=8,
            max_new_tokens=512, temperature=1.0, top_k=50, top_p=1.0, generator=None, seeds=None, decode=None,
            check_every=8):
    """Sample `group_size` completions for each of P prompts in one batch with the KV cache.

    input_ids (P, L), one IMAGE_TOKEN_INDEX each, left-padded (attention_mask); video_embeds (P, Q, d)
    from model.encode_video. Each prompt is prefilled once, its cache copied to its G rows; then all
    P*G rows decode together through `decode` (default the eager `decode_step`; a `FastDecode` is the
    same step, compiled). seeds (P,) fix each prompt's samples whatever shares the batch (None: drawn
    from `generator`). Every `check_every` steps, once half the rows or more have finished, they
    leave the batch and the cache, so a long straggler costs what it costs alone; no token changes."""
    lm = model.language_model
    step = decode.token_step if isinstance(decode, FastDecode) else partial(token_step, decode or lm.decode_step)
    pad_id = eos_id if pad_id is None else pad_id
    embeds, mask = model.embed(input_ids, video_embeds, attention_mask)  # (P, L-1+Q, d)
    if not mask[:, -1].all():
        raise ValueError("rollout needs left-padded prompts: every row's last position must be real")
    P, G, device = embeds.shape[0], group_size, embeds.device
    if seeds is None:
        seeds = torch.randint(0, 2**31, (P,), generator=generator, device=getattr(generator, "device", "cpu"))
    rows = torch.arange(P * G, device=device)
    row_seeds = _mix32(seeds.to(device).repeat_interleave(G) * G + rows % G)  # sample g of prompt p
    cache = model.new_cache(P, embeds.shape[1] + max_new_tokens)
    last = lm.logits(lm.model(embeds, mask, cache)[:, -1])  # prefill once per prompt: (P, V)
    cache, last = cache.repeat_interleave(G), last.repeat_interleave(G, dim=0)  # (P*G, ...)
    ids = torch.full((P * G, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(P * G, max_new_tokens, device=device)
    sampling = dict(eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p)
    steps = torch.arange(max_new_tokens, device=device)
    done = torch.zeros(P * G, dtype=torch.bool, device=device)  # of the rows in the batch
    tok, lp, done = pick_tokens(last, done, row_seeds, steps[0], **sampling)
    live = rows  # the rows still in the batch (all of them until half have finished)
    for t in range(max_new_tokens):
        if t:
            tok, lp, done = step(tok, cache, done, row_seeds, steps[t], **sampling)
        ids[live, t], logprobs[live, t] = tok, lp
        if t + 1 == max_new_tokens:
            break
        # A host sync costs time on a GPU: look only every few steps.
        if (t + 1) % check_every == 0:
            finished = int(done.sum())
            if finished == len(live):
                break
            n = max(2, len(live) - finished)  # never 1 row (one more compile): a finished row may stay
            if 2 * finished >= len(live) and n < len(live):  # drop them: a smaller batch, a smaller cache
                keep = done.sort(stable=True)[1][:n]
                live, cache, tok, done, row_seeds = live[keep], cache.select_rows(keep), tok[keep], done[keep], row_seeds[keep]
    ids, logprobs = ids[:, :t + 1], logprobs[:, :t + 1]
    if not logprobs.isfinite().all():  # one host sync per rollout
        raise FloatingPointError("rollout: non-finite logits (NaN/inf): the model has diverged")
    mask = completion_mask(ids, eos_id)
    return Rollout(ids, mask, logprobs * mask, ~(ids == eos_id).any(1), G)


def concat_rollouts(rolls):
    """Rollouts of several batches of prompts as one, completions right-padded to the longest."""
    T = max(r.completion_ids.shape[1] for r in rolls)
    cat = lambda name: torch.cat([F.pad(getattr(r, name), (0, T - getattr(r, name).shape[1])) for r in rolls])
    return Rollout(cat("completion_ids"), cat("mask"), cat("logprobs"), torch.cat([r.truncated for r in rolls]),
                   rolls[0].group_size)


def completion_mask(ids, eos_id):
    """(N, T) -> float mask, 1 up to and including each row's first eos (all 1 without eos)."""
    is_eos = (ids == eos_id).long()
    return (is_eos.cumsum(1) - is_eos == 0).float()  # no eos strictly before the position


def completion_logprobs(model, input_ids, video_embeds, completion_ids, completion_mask, attention_mask=None,
                        temperature=1.0, chunk=64):
    """Log-probs (N, T) of completion tokens given prompt + video, for the policy (with grad) or the
    reference (no_grad). input_ids (P, L), video_embeds (P, Q, d), completions (P*G, T). Only the T
    completion positions go through the LM head, `chunk` at a time, recomputed in backward under
    grad: (N, T, vocab) fp32 logits never exist at once."""
    P, G = input_ids.shape[0], completion_ids.shape[0] // input_ids.shape[0]
    prompt, pmask = model.embed(input_ids, video_embeds, attention_mask)  # (P, Lp, d)
    lm = model.language_model
    Lp, T = prompt.shape[1], completion_ids.shape[1]
    if lm.model.gradient_checkpointing and lm.model.training and torch.is_grad_enabled():
        # Checkpointed layers recompute in backward and cannot write a cache: each sample runs its whole
        # sequence, prompt included. -> the states that predict each completion token, (P*G, T, d)
        x = torch.cat([prompt.repeat_interleave(G, dim=0), lm.model.embed_tokens(completion_ids)], dim=1)
        mask = torch.cat([pmask.repeat_interleave(G, dim=0), completion_mask.bool()], dim=1)
        hidden = lm.model(x, mask)[:, Lp - 1:Lp - 1 + T]
    else:
        # The G samples of a prompt share it: its keys and values are computed once (P rows, not P*G),
        # then every completion attends to them through a KV cache, the gradient flowing back through it.
        cache = model.new_cache(P, Lp + T)
        first = lm.model(prompt, pmask, cache)[:, -1:]  # (P, 1, d): predicts each completion's first token
        cache = cache.repeat_interleave(G)
        rest = lm.model(lm.model.embed_tokens(completion_ids), completion_mask.bool(), cache)  # (P*G, T, d)
        hidden = torch.cat([first.repeat_interleave(G, dim=0), rest[:, :-1]], dim=1)

    def chunk_logp(h, ids):
        return (lm.logits(h).float() / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]

    out, grad = [], torch.is_grad_enabled()
    for s in range(0, T, chunk):
        h, ids = hidden[:, s:s + chunk], completion_ids[:, s:s + chunk]
        out.append(checkpoint(chunk_logp, h, ids, use_reentrant=False) if grad else chunk_logp(h, ids))
    return torch.cat(out, dim=1) * completion_mask


# ----------------------------------------------------------------------------- fast decoding and the sampler
# A decode step of the group reads every decoder weight to make G tokens (its floor: bench.py); eagerly it is
# ~1,500 kernels, mostly tiny elementwise ones launched from Python. torch.compile fuses them, a CUDA graph replays
# them with one launch: both need fixed shapes and addresses, hence the preallocated KV cache and its device-side
# write position (KVCache.pos), updated in place.


class FastDecode:
    """A drop-in `decode_step(tokens, cache)` with the eager one's results, faster, for sampling (no gradients);
    `token_step` is the same for `rollout`'s whole step, the token's choice included. compile: torch.compile (fused
    kernels): once, then once more with the sizes that changed (batch, cache length) dynamic, as every cache has
    the same layout and a batch never shrinks to 1 row (torch.compile specialises it). cuda_graph: capture
    the step as a CUDA graph and replay it (None: when on CUDA). A graph is captured the first time a step meets a
    cache (once per rollout, and when rows leave: it reads that cache's tensors at their addresses), replayed for
    every later step on it. Explicitly, not by torch.compile(mode="reduce-overhead"): its graph trees run without
    graphs a function that mutates inputs it does not own, as a step does the cache, and re-record for every new
    cache. Any failure to compile or capture: one warning, then eager decoding."""

    def __init__(self, lm, compile=True, cuda_graph=None):
        self.cuda_graph, self.graph = cuda_graph, None  # graph: (cache weakref, key, CUDAGraph, inputs, outputs)
        self.eager = {"logits": lambda tokens, cache: (lm.step_logits(tokens, cache),),  # both return tuples
                      "token": partial(token_step, lm.step_logits)}
        fast = partial(torch.compile, fullgraph=True) if compile else (lambda f: f)
        self.fns = {name: fast(f) for name, f in self.eager.items()}

    def __call__(self, tokens, cache):
        return self._run("logits", cache, tokens)[0]

    def token_step(self, tok, cache, done, seeds, t, **sampling):
        return self._run("token", cache, tok, done, seeds, t, **sampling)

    @torch.no_grad()
    def _run(self, name, cache, *tensors, **sampling):
        cache.reserve(1)  # host-side bounds check and count, outside any compiled or captured code
        graphs = tensors[0].is_cuda if self.cuda_graph is None else self.cuda_graph
        try:
            return self._step(name, cache, tensors, sampling, graphs)
        except Exception as e:  # no C++ compiler, a Triton failure on an old GPU, the recompile limit...
            if self.fns is self.eager and not graphs:
                raise
            warnings.warn(f"torch.compile or CUDA graph capture of the decode step failed, decoding eagerly: "
                          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            self.fns, self.cuda_graph, self.graph = self.eager, False, None
            return self._step(name, cache, tensors, sampling, graphs=False)

    def _step(self, name, cache, tensors, sampling, graphs):
        fn = partial(self.fns[name], **sampling)
        for t in cache.k + cache.v + [cache.valid]:  # the cache length varies from the first call: dynamic
            torch._dynamo.maybe_mark_dynamic(t, t.ndim // 2)
        if not graphs:
            return fn(tensors[0], cache, *tensors[1:])
        key = (name, tuple(sampling.items()))
        if self.graph is None or self.graph[0]() is not cache or self.graph[1] != key:
            self.graph = None  # free the old graph's memory before capturing the new one
            self.graph = (weakref.ref(cache), key, *self._capture(fn, cache, tensors))
        _, _, graph, static, outs = self.graph
        for s, t in zip(static, tensors):
            s.copy_(t)
        graph.replay()
        return tuple(o.clone() for o in outs)  # the next replay overwrites `outs`

    def _capture(self, fn, cache, tensors):
        static = [t.clone() for t in tensors]
        call = lambda: fn(static[0], cache, *static[1:])  # noqa: E731
        # Warm up once on a side stream (torch.compile compiles, cuBLAS initialises: neither may
        # happen during a capture), then undo the warm-up's writes to the cache. Its keys and values
        # went to the slot the real step writes again; its pos, next_pos and valid are restored.
        saved = [t.clone() for t in (cache.pos, cache.next_pos, cache.valid)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                call()
        finally:
            torch.cuda.current_stream().wait_stream(side)
            for t, before in zip((cache.pos, cache.next_pos, cache.valid), saved):
                t.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels without running them
            outs = call()
        return graph, static, outs


def frozen_copy(model, dtype=None):
    """A frozen copy of connector + decoder (cast to `dtype`), sharing the model's frozen vision tower:
    the reference model, and the sampler's low-precision copy."""
    tower, model.vision_tower = model.vision_tower, None  # shared, not copied
    try:
        twin = copy.deepcopy(model).to(dtype)
    finally:
        model.vision_tower = tower
    twin.vision_tower = tower
    return twin.requires_grad_(False).eval()


class Sampler:
    """What rollouts sample from, and how: `rollout(...)` with this model and decode step. On a GPU the
    trainable parts are copied once in `dtype` (bf16), with a bf16 KV cache: a decode step reads 6 GB of weights
    rather than converting 12 GB of fp32 master weights under autocast. `refresh()` copies the policy's weights
    in after every optimizer step, in place, so a compiled step stays valid. dtype None (the CPU): the policy
    samples itself. compile: decode through a FastDecode. own_copy: a copy even in the policy's dtype (a policy
    sharded with FSDP cannot decode rank by rank). cuda_graph: FastDecode's."""

    def __init__(self, policy, dtype=None, compile=False, own_copy=False, cuda_graph=None):
        self.policy, self.model = policy, policy
        if own_copy or (dtype is not None and dtype != policy.language_model.model.embed_tokens.weight.dtype):
            self.model = frozen_copy(policy, dtype)
        lm = self.model.language_model
        self.decode = FastDecode(lm, cuda_graph=cuda_graph) if compile else lm.decode_step

    @torch.no_grad()
    def refresh(self):
        if self.model is not self.policy:
            for mine, master in zip(self.model.parameters(), self.policy.parameters()):
                if master.requires_grad:  # a DTensor shard (FSDP) is gathered whole first
                    mine.copy_(master.full_tensor() if hasattr(master, "full_tensor") else master)

    def rollout(self, input_ids, video_features, eos_id, **kw):
        """`rollout` from frozen vision features (P, T*728, 1152) through this model's connector."""
        was_training, model = self.model.training, self.model.eval()
        try:
            with torch.no_grad():
                return rollout(model, input_ids, model.connect(video_features), eos_id, decode=self.decode, **kw)
        finally:
            model.train(was_training)


# ----------------------------------------------------------------------------- the loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.01, loss_type="grpo", epsilon_low=0.2,
              epsilon_high=None, truncated=None, max_completion_length=None, kl_clamp=100.0):
    """The GRPO loss of N completions of T tokens -> (loss scalar, {"loss", "kl", "clip_ratio"} floats).

    logp (N, T) policy log-probs with grad; old_logp (N, T) of the sampling policy, or None for one
    update per rollout (ratio = exp(logp - logp.detach()) = 1); ref_logp (N, T) of the reference, or
    None (or beta 0) for no KL; advantages (N,); mask (N, T), 1 on valid tokens; truncated (N,) bool
    rows masked out entirely. Per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    + beta * KL, KL the k3 estimator (>= 0, 0 where ref == logp) clamped to +-kl_clamp as the original
    does (None: not clamped). Then "grpo": mean over each completion's valid tokens, then over all N;
    "bnpo": sum / valid tokens; "dr_grpo": sum / (N * max_completion_length, default T); "dapo": sum /
    valid tokens of the global batch, here "bnpo". Metrics: "kl" the mean KL over valid tokens (0.0
    without a reference); "clip_ratio" the share of valid tokens whose clipped term is chosen."""
    N, T = logp.shape
    for name, x, shape in (("old_logp", old_logp, (N, T)), ("ref_logp", ref_logp, (N, T)),
                           ("mask", mask, (N, T)), ("advantages", advantages, (N,)), ("truncated", truncated, (N,))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(x.shape)}, expected {shape} (logp is {(N, T)})")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.float() if truncated is None else mask.float() * (~truncated.bool()).float()[:, None]

    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    A = advantages.float()[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * A)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if kl_clamp is not None:
            kl = kl.clamp(-kl_clamp, kl_clamp)
        if beta != 0:
            per_token = per_token + beta * kl

    valid = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / valid
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (N * (T if max_completion_length is None else max_completion_length))

    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon_low) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
        return loss, {"loss": loss.item(), "kl": 0.0 if kl is None else ((kl * mask).sum() / valid).item(),
                      "clip_ratio": ((clipped.float() * mask).sum() / valid).item()}


# ----------------------------------------------------------------------------- metrics

# The paper's "aha" signal: the model stops to re-examine its answer.
REFLECTION = re.compile(r"\b(?:wait\b|re-?check|let me reconsider)", re.IGNORECASE)


def step_metrics(rollout, completions, scores, group_size, kl=None, times=None):
    """Floats to log for one step, under TRL's names (reward_std: the mean of the groups' stds; format,
    truncated, zero_std_groups, reflection: shares of completions or groups; completion_length: tokens up to
    and including eos), kl when given; with `times` {phase: seconds}: time/<phase> and tokens_per_s (N x steps
    decoded positions per second of the "rollout" phase)."""
    reward, lengths = scores["reward"].float(), rollout.mask.sum(1).float()
    out = {"reward": reward.mean().item(), "reward_std": reward.view(-1, group_size).std(1).mean().item(),
           **{f"reward/{name}": v.float().mean().item() for name, v in scores.items() if name != "reward"},
           "accuracy": scores["accuracy"].float().mean().item(), "format": (scores["format"] > 0).float().mean().item(),
           "completion_length": lengths.mean().item(), "completion_length_min": lengths.min().item(),
           "completion_length_max": lengths.max().item(), "truncated": rollout.truncated.float().mean().item(),
           "zero_std_groups": zero_variance_groups(reward, group_size).float().mean().item(),
           "reflection": sum(bool(REFLECTION.search(c)) for c in completions) / len(completions),
           **({} if kl is None else {"kl": float(kl)}),
           **{f"time/{phase}": float(seconds) for phase, seconds in (times or {}).items()}}
    if times and times.get("rollout"):
        out["tokens_per_s"] = rollout.completion_ids.numel() / times["rollout"]
    return out
