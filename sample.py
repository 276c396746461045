"""Ask a TinyLLaVA-Video model about a video, or score it on a multiple-choice set.

    python sample.py --ckpt DIR --video clip.mp4 --question "What is the man doing?" --options "sit down" "run"
    python sample.py --ckpt DIR --eval test.jsonl                 # accuracy, predictions.jsonl, resumable
    python sample.py --ckpt DIR --eval test.jsonl --probe-reasoning  # does the answer depend on the thinking?
    python sample.py --ckpt DIR --bench mvbench --root MVBench    # or videomme, mlvu, mmvu: the paper's table
    python sample.py --ckpt DIR --bench mvbench --root MVBench --protocol original --samples 3  # as the paper did

Two prompt modes, as the paper evaluates: "reason" asks for <think> and <answer> tags and reads the letter
inside <answer>; "option" asks for the letter directly. An answer with no readable letter counts as wrong,
and is counted separately (the original code guessed a random option instead).

The benchmarks (readers, the clean and the original protocol, the tables) are in eval.py; here they are
answered, resumably, with the same code as --eval.
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval
import grpo
import weights
from eval import UsageError
from runs import RunError, hold, releasing_locks


def load(ckpt, device=None, dtype=None):
    """-> model (eval mode) and tokenizer from a checkpoint directory."""
    has = lambda *names: all(os.path.exists(os.path.join(ckpt, f)) for f in names)  # noqa: E731
    if not os.path.isdir(ckpt) or not has("config.json"):
        raise UsageError(f"checkpoint {ckpt}: not a directory with config.json")
    if not has("tokenizer.json") and not has("vocab.json", "merges.txt"):
        raise UsageError(f"checkpoint {ckpt}: no tokenizer.json (nor vocab.json and merges.txt) beside the weights")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # CUDA graphs are made on the current device
        torch.cuda.set_device(device)
        if not torch.cuda.is_bf16_supported():
            print("sample.py: this GPU has no bf16 (V100, T4 ...): the model runs in fp32", file=sys.stderr)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    model = weights.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    return model, data.Tokenizer(ckpt, model.config.text.vocab_size)


def checkpoint_id(ckpt):
    """What tells one checkpoint's weights from another's, cheaply: its path, and a hash of config.json and
    of each weights file's name, size and modification time (every save writes new files)."""
    h = hashlib.sha256(open(os.path.join(ckpt, "config.json"), "rb").read())
    for f in sorted(glob.glob(os.path.join(ckpt, "model*.safetensors"))):
        h.update(f"{os.path.basename(f)} {os.stat(f).st_size} {os.stat(f).st_mtime_ns}".encode())
    return f"{os.path.abspath(ckpt)} {h.hexdigest()[:16]}"


def question_bytes(text, L, S, e):
    """Bytes one question holds at the peak of its prefill of L = video + prompt tokens into S = L + max_new_tokens
    cache slots (text: the decoder's config, e: bytes per element): its keys and values; the additive mask, once as
    L x S and once per query head of a key/value head (8 L x S); the MLP's three L x intermediate tensors and a few
    L x hidden ones. A slight overestimate (tests/test_gpu.py measures it on the CPU)."""
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * e  # per token
    rep = text.num_attention_heads // text.num_key_value_heads
    return kv * S + (rep + 1) * L * S * e + L * e * (3 * text.intermediate_size + 6 * text.hidden_size)


def default_batch_size(model, max_new_tokens, frames, prompt_tokens=1024):
    """Questions answered together: on a GPU as many as 60% of the free memory holds, at most 256; 8 on a CPU.
    The videos are encoded 8 at a time, once for the batch."""
    w = model.language_model.model.embed_tokens.weight
    if not w.is_cuda:
        return 8
    v, e, L = model.config.vision, w.element_size(), model.config.connector.num_queries + prompt_tokens
    per_question = question_bytes(model.config.text, L, L + max_new_tokens, e)
    video = 8 * frames * (v.image_size // v.patch_size) ** 2 * e * (4 * v.hidden_size + v.intermediate_size)
    free, _ = torch.cuda.mem_get_info(w.device)
    return max(1, min(256, int((0.6 * free - video) // per_question)))


# ----------------------------------------------------------------------------- answers

def parse_answer(text, num_options=26, mode="reason"):
    """The option letter a completion chose, or None. reason: the first standalone capital letter inside
    the first <answer>...</answer>; option: the first standalone capital letter of the whole text."""
    if mode == "reason":
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        if not m:
            return None
        text = m.group(1)
    letters = "".join(chr(ord("A") + i) for i in range(num_options))
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return m.group(1) if m else None


THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def check_reasoning(text, fact, options, answer, pred):
    """For a row that says what its reasoning must state (`fact`: a regex whose group captures the option it
    names): -> (the thinking states the true option and no other, it states exactly the option answered)."""
    m = THINK.search(text)
    stated = set(re.findall(fact, m.group(1))) & set(options) if m else set()
    named = lambda letter: {options[ord(letter) - 65]} if letter and ord(letter) - 65 < len(options) else None  # noqa: E731
    return stated == named(answer), stated == named(pred)


def probe_reasoning(texts, ask, num_options):
    """Early answering and corrupted reasoning (Lanham et al. 2023) for the in-format answers among `texts`: each
    is asked again with its thinking removed, cut to its first half (in words), or replaced by the next other
    answer's different thinking, the answer prefilled up to "<answer" and continued. ask(rows, prefills) -> the
    continuations; num_options: per text. -> per text None (not in format) or {"removed", "half", "swapped"}: the
    letter then given."""
    out = [{} if grpo.format_reward(t) > 0 else None for t in texts]
    at = [i for i, o in enumerate(out) if o is not None]
    thinks = [THINK.search(texts[i]) for i in at]
    rows, prefills, keys = [], [], []
    for j, (i, m) in enumerate(zip(at, thinks)):
        words, text = m.group(1).split(), texts[i]
        other = next((o.group(1) for o in thinks[j + 1:] + thinks[:j] if o.group(1) != m.group(1)), None)
        for key, edit in (("removed", ""), ("half", " ".join(words[:len(words) // 2])), ("swapped", other)):
            if edit is not None:
                rows.append(i), keys.append(key)
                prefills.append(text[:m.start(1)] + edit + text[m.end(1):text.index("<answer>") + len("<answer")])
    for i, key, cont in zip(rows, keys, ask(rows, prefills) if rows else []):
        out[i][key] = parse_answer("<answer" + cont, num_options[i])
    return out


@torch.no_grad()
def generate(model, tok, questions, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0, generator=None,
             decode=None, prefills=None):
    """One answer per question: questions (B strings), pixels (B, T, 3, S, S) -> B strings, the prompts
    left-padded and decoded together with the KV cache through `decode` (a grpo.FastDecode on a GPU). With
    `prefills` (B strings) each answer is forced to start with its prefill and only the continuation returned."""
    device = next(model.parameters()).device
    ids, mask = data.collate_prompts([tok.prompt_ids(q) + tok.encode(p) for q, p in zip(questions, prefills or [""] * len(questions))],
                                  tok.pad_id)
    dtype = next(model.vision_tower.parameters()).dtype
    embeds = torch.cat([model.encode_video(pixels[i:i + 8].to(device, dtype)) for i in range(0, len(pixels), 8)])
    ro = grpo.rollout(model, ids.to(device), embeds, tok.eos_id, tok.pad_id, mask.to(device), group_size=1,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                   decode=decode)
    return [tok.decode(r[m > 0]) for r, m in zip(ro.completion_ids.cpu(), ro.mask.cpu())]


def generate_fitting(fits, model, tok, questions, pixels, *args, prefills=None, **kw):
    """`generate`, fits["batch"] questions at a time (all, if unset): out of GPU memory, that batch halves (said once)
    and goes on."""
    out = []
    while len(out) < len(questions):
        n = fits.get("batch") or len(questions)  # no limit until memory ran out once
        at = slice(len(out), len(out) + n)
        try:
            out += generate(model, tok, questions[at], pixels[at], *args, **kw, **({"prefills": prefills[at]} if prefills else {}))
        except torch.cuda.OutOfMemoryError:
            if n == 1:
                raise
            if not fits.get("halved"):
                tqdm.write(f"out of GPU memory at batch size {n}: halving it until it fits", file=sys.stderr)
            fits.update(batch=n // 2, halved=True)
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def stream(model, tok, question, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0, decode=None):
    """Yield the answer to one question piece by piece as it is generated (pixels (T, 3, S, S))."""
    device = next(model.parameters()).device
    ids = torch.tensor([tok.prompt_ids(question)], device=device)
    embeds, mask = model.embed(ids, model.encode_video(pixels[None].to(device, next(model.vision_tower.parameters()).dtype)))
    lm = model.language_model
    cache = model.new_cache(1, embeds.shape[1] + max_new_tokens)
    logits = lm.logits(lm.model(embeds, mask, cache)[:, -1])
    out, shown = [], ""
    for _ in range(max_new_tokens):
        token, _ = grpo.sample_token(logits, temperature, top_k, top_p)
        if token.item() == tok.eos_id:
            break
        out.append(token.item())
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(shown):]
            shown = text
        logits = (decode or lm.decode_step)(token, cache)
    if out and tok.decode(out) != shown:  # the end: what an unfinished character held back, as generate decodes it
        yield tok.decode(out)[len(shown):]


# ----------------------------------------------------------------------------- scoring a multiple-choice set

def read_predictions(path, run=None):
    """Predictions an interrupted run wrote: {item key: record}. With `run` (the checkpoint and settings
    each record carries), a file holding another run's answers is moved aside to PATH.stale and nothing
    is resumed: answers are only reused for the model and settings that made them."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[r["key"]] = r
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by the interruption: that item is redone
        if run is not None and any(r.get("run") != run for r in done.values()):
            os.replace(path, path + ".stale")
            print(f"sample.py: {path} holds answers of another checkpoint or other settings: moved to "
                  f"{path}.stale, starting afresh", file=sys.stderr)
            return {}
    return done


def num_options(s):
    return len(s.meta.get("options") or []) or 26


def load_clips(samples, frames, size):
    """-> the samples whose video reads, their clips (T, 3, S, S) and frame indices; and those whose does not (told)."""
    batch, pixels, used, lost = [], [], [], []
    for s in samples:
        try:
            pix, idx = eval.load_clip(s, frames, size)
            batch.append(s), pixels.append(pix), used.append(idx.tolist())
        except data.VideoError as e:
            lost.append(s)
            tqdm.write(f"missing video, counted as skipped: {e}", file=sys.stderr)
    return batch, pixels, used, lost


def ask_clips(fits, model, tok, questions, pixels, max_new_tokens, prefills=None, strip=False, **kw):
    """generate_fitting over clips of different lengths (a "unique" pick gives a short clip fewer frames): each
    length is asked apart. -> the answers, in order (stripped with `strip`)."""
    texts = [None] * len(questions)
    for shape in dict.fromkeys(p.shape for p in pixels):
        at = [k for k, p in enumerate(pixels) if p.shape == shape]
        answers = generate_fitting(fits, model, tok, [questions[k] for k in at], torch.stack([pixels[k] for k in at]),
                                   max_new_tokens, prefills=[prefills[k] for k in at] if prefills else None, **kw)
        for k, text in zip(at, answers):
            texts[k] = text.strip() if strip else text
    return texts


def make_record(s, text, frames, mode, protocol, seed, run, probe=False, probed=None):
    """One answer's record: its letter against the solution's, the exact prompt, the frame indices, the reasoning
    checks of a row with a "fact" pattern, the probe's letters (with `probe`), the sample's meta but its options."""
    original = protocol == "original"
    rng = random.Random(f"{seed}:{sample_key(s)}")  # the original's guess, repeatable
    pred, guessed = eval.parse_original(text, s.meta["choices"], rng) if original else (
        parse_answer(text, num_options(s), mode), False)
    # GRPO rows give the solution as "<answer>B</answer>", multiple-choice rows as "B"
    answer = parse_answer(s.solution, 26, "reason" if "<answer>" in s.solution else "option")
    checks = check_reasoning(text, s.meta["fact"], s.meta.get("options") or [], answer, pred) if "fact" in s.meta else ()
    return {"key": sample_key(s), "video": s.video, "answer": answer, "pred": pred,
            "correct": pred is not None and pred == answer, "output": text, "num_options": num_options(s),
            "prompt": data.build_prompt(s.question), "frames": frames,
            **({"guessed": guessed, "seed": seed} if original else {}), **({"probe": probed} if probe else {}),
            **dict(zip(("reasoning_right", "reasoning_agrees"), checks)),
            **{k: v for k, v in s.meta.items() if k != "options"}, "run": run}


def append_to(path):
    """`path` opened to append to, a last line an interruption cut short ended first so the next starts its own."""
    out = open(path, "a")
    if out.tell() > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write("\n")
    return out


@releasing_locks
def evaluate(model, tok, samples, mode="reason", predictions=None, batch_size=8, frames=None, max_new_tokens=512,
             progress=True, desc="eval", protocol="clean", seed=0, decode=None, run=None, probe=False):
    """Answer every sample (data.Sample: `question` holds the options and the mode's suffix) and score it (make_record;
    with `probe`, probe_reasoning too). protocol "original" samples (temperature 1, top-k 50) from a generator seeded
    with `seed`, so a command repeats its answers. Each answer is appended to `predictions` as soon as it exists; items
    found there with the same `run` are not asked again, nor is an unreadable video (told, counted, asked next run).
    -> {"accuracy", "correct", "total", "unparsed", "missing_videos", "tokens_per_s", "records", "missing"}."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    sampling = dict(temperature=1.0, top_k=50, top_p=1.0, generator=generator) if protocol == "original" else {}
    frames = frames or int(model.config.raw.get("num_frames", 16))
    if predictions:  # one writer per predictions file: a second would interleave its answers with ours
        hold(predictions + ".lock", f"predictions file {predictions}")
    done = read_predictions(predictions, run) if predictions else {}
    records = [done[k] for k in (sample_key(s) for s in samples) if k in done]
    todo = [s for s in samples if sample_key(s) not in done]
    missing, tokens, seconds, fits = [], 0, 0.0, {}
    ask = functools.partial(ask_clips, fits, model, tok, decode=decode, strip=protocol == "original", **sampling)
    bar = tqdm(total=len(samples), initial=len(records), desc=desc, disable=not progress, dynamic_ncols=True)
    with append_to(predictions) if predictions else contextlib.nullcontext() as out, bar:
        for i in range(0, len(todo), batch_size):
            batch, pixels, used, lost = load_clips(todo[i:i + batch_size], frames, model.config.vision.image_size)
            missing += lost
            bar.update(len(lost))
            if not batch:
                continue
            t = time.perf_counter()
            texts = ask([s.question for s in batch], pixels, max_new_tokens)
            probes = probe_reasoning(texts, lambda rows, prefills: ask(  # the letter after the edited thinking
                [batch[j].question for j in rows], [pixels[j] for j in rows], 8, prefills),
                [num_options(s) for s in batch]) if probe else [None] * len(batch)
            seconds += time.perf_counter() - t
            tokens += sum(len(tok.encode(x)) + 1 for x in texts)
            for s, text, idx, probed in zip(batch, texts, used, probes):
                records.append(make_record(s, text, idx, mode, protocol, seed, run, probe, probed))
                if predictions:
                    print(json.dumps(records[-1]), file=out, flush=True)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}", missing=len(missing),
                            tok_s=f"{tokens / seconds:.0f}")
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(len(records), 1), "correct": correct, "total": len(records),
            "unparsed": sum(r["pred"] is None for r in records), "missing_videos": len(missing), "records": records,
            "missing": missing, "tokens_per_s": tokens / seconds if seconds else None}


def probe_summary(records):
    """The probe's rates: of the items probed, the fraction whose letter stayed the same under each edit, and counts."""
    probed = [r for r in records if r.get("probe")]
    counts = {k: sum(k in r["probe"] for r in probed) for k in ("removed", "half", "swapped")}
    same = {k: sum(r["probe"].get(k, 0) == r["pred"] for r in probed) / max(n, 1) for k, n in counts.items()}
    print(f"reasoning probe, {len(probed)} in-format answers: the letter stays the same with the thinking removed "
          f"{same['removed']:.3f}, cut to its first half {same['half']:.3f}, swapped for another's {same['swapped']:.3f}")
    return {"probed": len(probed), "same_letter": same, "counts": counts,
            "accuracy": sum(r["correct"] for r in records) / max(len(records), 1)}


def sample_key(s):
    return f"{s.meta.get('line', '')}:{s.video}:{s.question}"


def run_benchmark(model, tok, samples, bench, mode, predictions, batch_size, frames, max_new_tokens,
                  protocol="clean", seed=0, decode=None, run=None, probe=False):
    """Answer (or resume) every item, print the table, write the summary beside the predictions."""
    _, group, average = eval.BENCHMARKS[bench]
    res = evaluate(model, tok, samples, mode, predictions, batch_size, frames, max_new_tokens, desc=bench,
                   protocol=protocol, seed=seed, decode=decode, run=run, probe=probe)
    order = list(dict.fromkeys(s.meta[group] for s in samples))
    if bench == "videomme":
        order = sorted(order, key=lambda d: eval.VIDEOMME_DURATIONS.index(d) if d in eval.VIDEOMME_DURATIONS else len(order))
    summary = eval.summarize(res["records"], group, average, order, [s.meta for s in res["missing"]])
    if probe:
        summary["reasoning_probe"] = probe_summary(res["records"])
    rule = (f"original protocol, seed {seed}: sampled answers; an unparsed answer was guessed at random, as the "
            f"original did" if protocol == "original" else "clean protocol: an unparsed answer counts as wrong "
            "(guessed %: as if it were a random guess, the original code's rule)")
    print(eval.format_table(f"{bench}, {mode} mode, {frames} frames, {rule}; a missing video is left out.", summary, group))
    if summary["missing"]:
        print(f"warning: {summary['missing']} of {len(samples)} items have no readable video: this is not the "
              f"benchmark's full score")
    path = os.path.splitext(predictions)[0] + ".summary.json"
    with open(path, "w") as f:
        json.dump({"benchmark": bench, "mode": mode, "protocol": protocol, "seed": seed, "run": run, **summary}, f, indent=1)
    print(f"predictions in {predictions}, summary in {path}")
    return summary


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer a question about a video, or score a multiple-choice set or one "
                                "of the paper's benchmarks.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: (print(f"sample.py: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--video", help="video file to ask about")
    p.add_argument("--question", help="the question")
    p.add_argument("--options", nargs="+", help="answer options, lettered A, B, C... in this order")
    p.add_argument("--mode", choices=["reason", "option"], default="reason",
                   help="reason: think in <think> tags, answer in <answer> tags; option: answer with the letter")
    p.add_argument("--eval", metavar="FILE.jsonl", help="score a multiple-choice file (video, question, options, answer)")
    p.add_argument("--bench", choices=sorted(eval.BENCHMARKS), help="score one of the paper's benchmarks, read from --root")
    p.add_argument("--probe-reasoning", action="store_true", help="--eval, --bench: ask each in-format answer again "
                   "with its thinking removed, halved or swapped; report how often the letter stays (docs/reasoning.md)")
    p.add_argument("--protocol", choices=["clean", "original"], default="clean",
                   help="--bench: clean (greedy, strict parser), or original: the paper's own evaluation (its prompts, "
                        "sampled answers, random guess when unparsed, its frames), to reproduce its table")
    p.add_argument("--samples", type=int, default=1,
                   help="--protocol original: runs with seeds --seed, --seed+1, ...; their mean and std are reported")
    p.add_argument("--seed", type=int, default=0, help="--protocol original: seed of the sampling and the guesses")
    p.add_argument("--root", help="--bench: the benchmark's folder as downloaded; --eval: the directory its videos "
                                  "are relative to (default: the file's)")
    p.add_argument("--predictions", help="per-item predictions (JSONL), resumed if present (default: beside --eval; "
                                         "CKPT/eval/BENCH.MODE.jsonl for --bench, CKPT/eval/BENCH.original.seedS.jsonl "
                                         "with --protocol original, where .seedS is added to a given name too)")
    p.add_argument("--batch-size", type=int, default=0, help="questions generated together in --eval and --bench "
                   "(0: as many as the GPU's free memory holds; 8 on a CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through torch.compile and a CUDA graph (default: on a GPU)")
    p.add_argument("--frames", type=int, default=0, help="frames per video (0: the checkpoint's, else 16)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: 512; 1024 with --protocol original)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    return p.parse_args(argv)


def check_args(args):
    """Every misuse of the flags, found before the model loads: a one-line UsageError."""
    original, reason = args.protocol == "original", args.mode == "reason"
    for ok, msg in [(args.bench or args.eval or (args.video and args.question),
                     "give --video and --question, --eval FILE.jsonl, or --bench NAME --root DIR"),
                    (not (args.bench and args.eval), "give --bench or --eval, not both"),
                    (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                    (args.frames >= 0, "--frames must be >= 0"), (args.top_k >= 0, "--top-k must be >= 0"),
                    (args.batch_size >= 0, "--batch-size must be >= 0 (0: as many as fit)"),
                    (args.temperature >= 0, "--temperature must be >= 0"), (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                    (not original or (args.bench and reason),
                     "--protocol original is for --bench, in reason mode (the original asked for reasons)"),
                    (args.samples == 1 or (args.samples > 1 and original),
                     "--samples K: K >= 1, and K > 1 only with --protocol original (clean decoding is greedy)"),
                    (not args.probe_reasoning or (not original and reason and (args.eval or args.bench)),
                     "--probe-reasoning is for --eval or --bench, in reason mode with the clean protocol"),
                    (not args.bench or (args.root and os.path.isdir(args.root)),
                     f"--bench {args.bench} needs --root DIR, the benchmark's folder (got {args.root})")]:
        if not ok:
            raise UsageError(msg)


def score_benchmark(args, model, tok, samples, run, **ask):
    """--bench: one run, or with --protocol original one per seed and the spread of their averages."""
    original = args.protocol == "original"
    preds = args.predictions or os.path.join(args.ckpt, "eval", f"{args.bench}.{args.protocol if original else args.mode}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(preds)), exist_ok=True)
    seeds = range(args.seed, args.seed + args.samples)
    runs = [run_benchmark(model, tok, samples, args.bench, args.mode, f"{os.path.splitext(preds)[0]}.seed{seed}.jsonl"
                          if original else preds, protocol=args.protocol, seed=seed, probe=args.probe_reasoning,
                          run={**run, "seed": seed} if original else run, **ask) for seed in seeds]
    if len(runs) > 1:  # one sampled run is noisy: the spread over seeds says how much
        averages = [r["average"] for r in runs]
        mean, std = float(np.mean(averages)), float(np.std(averages, ddof=1))
        print(f"{args.bench}, original protocol, {len(runs)} runs (seeds {seeds[0]}-{seeds[-1]}):"
              f" average {100 * mean:.1f} +- {100 * std:.1f} % (mean +- std over runs)")
        with open(os.path.splitext(preds)[0] + ".summary.json", "w") as f:
            json.dump({"benchmark": args.bench, "protocol": args.protocol, "seeds": list(seeds), "averages": averages,
                       "mean": mean, "std": std}, f, indent=1)


def score_file(args, model, tok, run, **ask):
    """--eval: the accuracy over a multiple-choice file (and the reasoning probe's summary beside it)."""
    if not os.path.exists(args.eval):
        raise UsageError(f"--eval {args.eval}: no such file")
    samples = data.read_samples(args.eval, args.root, mode=args.mode)[0]
    preds = args.predictions or os.path.splitext(args.eval)[0] + f".{args.mode}.predictions.jsonl"
    res = evaluate(model, tok, samples, args.mode, preds, run=run, probe=args.probe_reasoning, **ask)
    speed = f", {res['tokens_per_s']:.0f} tokens/s" if res["tokens_per_s"] else ""
    print(f"accuracy {res['accuracy']:.4f} ({res['correct']}/{res['total']}), unparsed {res['unparsed']}, "
          f"missing videos {res['missing_videos']}{speed}; predictions in {preds}")
    if args.probe_reasoning:
        with open(os.path.splitext(preds)[0] + ".summary.json", "w") as f:
            json.dump({"accuracy": res["accuracy"], "total": res["total"], "run": run,
                       "reasoning_probe": probe_summary(res["records"])}, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        # the benchmark is read first: a layout error should not wait for the model to load
        samples = eval.BENCHMARKS[args.bench][0](args.root, args.mode, args.protocol) if args.bench else None
        model, tok = load(args.ckpt, args.device)
        frames = args.frames or int(model.config.raw.get("num_frames", 16))  # the checkpoint's, else the paper's
        max_new_tokens = args.max_new_tokens or (1024 if args.protocol == "original" else 512)
        lm = model.language_model
        on_gpu = lm.model.embed_tokens.weight.is_cuda  # there answers decode through a compiled step + CUDA graph
        decode = grpo.FastDecode(lm) if (on_gpu if args.compile is None else args.compile) else lm.decode_step
        run = {"checkpoint": checkpoint_id(args.ckpt), "mode": args.mode, "frames": frames, "max_new_tokens": max_new_tokens,
               "dtype": str(next(model.parameters()).dtype), "protocol": args.protocol,
               **({"probe": True} if args.probe_reasoning else {})}
        ask = dict(batch_size=args.batch_size or default_batch_size(model, max_new_tokens, frames), frames=frames,
                   max_new_tokens=max_new_tokens, decode=decode, run=run)
        if args.bench:
            score_benchmark(args, model, tok, samples, **ask)
        elif args.eval:
            score_file(args, model, tok, **ask)
        elif not os.path.exists(args.video):
            raise UsageError(f"--video {args.video}: no such file")
        else:  # one question: the answer printed as it is generated
            pixels = data.load_video(args.video, num_frames=frames, size=model.config.vision.image_size)
            question = data.mc_question(args.question, args.options, args.mode) if args.options else args.question
            for piece in stream(model, tok, question, pixels, max_new_tokens, args.temperature, args.top_k, args.top_p,
                                decode):
                print(piece, end="", flush=True)
            print()
        return 0
    except (UsageError, RunError, data.VideoError, data.DataError, weights.CheckpointError, FloatingPointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
