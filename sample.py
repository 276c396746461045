"""Ask a TinyLLaVA-Video model about a video, or score it on a multiple-choice set.

    python sample.py --ckpt DIR --video clip.mp4 --question "What is the man doing?" --options "sit down" "run"
    python sample.py --ckpt DIR --eval test.jsonl                 # accuracy, predictions.jsonl, resumable

Two prompt modes, as the paper evaluates: "reason" asks for <think> and <answer> tags and reads the letter
inside <answer>; "option" asks for the letter directly. An answer with no readable letter counts as wrong,
and is counted separately (the original code guessed a random option instead).
"""

import argparse
import json
import os
import re
import sys

import torch
from tqdm import tqdm

import data as D
import grpo as G
import model as M


class UsageError(Exception):
    """Bad command-line input (a missing checkpoint, video or field): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- loading


def load(ckpt, device=None, dtype=None):
    """-> model (eval mode) and tokenizer from a checkpoint directory holding tokenizer.json."""
    if not os.path.isdir(ckpt) or not os.path.exists(os.path.join(ckpt, "config.json")):
        raise UsageError(f"checkpoint {ckpt}: not a directory with config.json")
    if not os.path.exists(os.path.join(ckpt, "tokenizer.json")):
        raise UsageError(f"checkpoint {ckpt}: no tokenizer.json beside the weights")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = M.TinyLLaVA.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    return model, D.Tokenizer(ckpt)


def default_frames(model):
    """Frames per video: what the checkpoint was trained with when its config says, else the paper's 16."""
    return int(model.config.raw.get("num_frames", 16))


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


@torch.no_grad()
def generate(model, tok, questions, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0, generator=None):
    """One answer per question: questions (B strings), pixels (B, T, 3, S, S) -> B strings.
    The prompts are left-padded and decoded together with the KV cache."""
    device = next(model.parameters()).device
    ids, mask = D.collate_prompts([tok.prompt_ids(q) for q in questions], tok.pad_id)
    embeds = model.encode_video(pixels.to(device, next(model.vision_tower.parameters()).dtype))
    ro = G.rollout(model, ids.to(device), embeds, tok.eos_id, tok.pad_id, mask.to(device), group_size=1,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return [tok.decode(r[m > 0]) for r, m in zip(ro.completion_ids.cpu(), ro.mask.cpu())]


@torch.no_grad()
def stream(model, tok, question, pixels, max_new_tokens=512, temperature=0.0, top_k=50, top_p=1.0):
    """Yield the answer to one question piece by piece as it is generated (pixels (T, 3, S, S))."""
    device = next(model.parameters()).device
    ids = torch.tensor([tok.prompt_ids(question)], device=device)
    embeds, mask = model.embed(ids, model.encode_video(pixels[None].to(device, next(model.vision_tower.parameters()).dtype)))
    lm = model.language_model
    cache = model.new_cache(1, embeds.shape[1] + max_new_tokens)
    logits = lm.logits(lm.model(embeds, mask, cache)[:, -1])
    out, shown = [], ""
    for _ in range(max_new_tokens):
        token, _ = G.sample_token(logits, temperature, top_k, top_p)
        if token.item() == tok.eos_id:
            break
        out.append(token.item())
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(shown):]
            shown = text
        logits = lm.decode_step(token, cache)


# ----------------------------------------------------------------------------- scoring a multiple-choice set


def read_predictions(path):
    """Predictions already written by an interrupted run: {item key: record}."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[r["key"]] = r
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut short by the interruption: that item is redone
    return done


def evaluate(model, tok, samples, mode="reason", predictions=None, batch_size=8, frames=None, max_new_tokens=512,
             progress=True):
    """Answer every sample greedily and compare the letter with `sample.solution`.

    samples: data.Sample with `question` already holding the options and the mode's suffix. With a
    `predictions` path, each answer is appended as a JSON line as soon as it exists, and the items found
    there are not asked again. -> {"accuracy", "correct", "total", "unparsed", "missing_videos"} plus
    the records."""
    frames = frames or default_frames(model)
    size = model.config.vision.image_size
    done = read_predictions(predictions) if predictions else {}
    records = [done[k] for k in (sample_key(s) for s in samples) if k in done]
    todo = [s for s in samples if sample_key(s) not in done]
    missing = 0
    out = open(predictions, "a") if predictions else None
    try:
        bar = tqdm(total=len(samples), initial=len(records), desc="eval", disable=not progress, dynamic_ncols=True)
        for i in range(0, len(todo), batch_size):
            batch, pixels = [], []
            for s in todo[i:i + batch_size]:
                try:
                    pixels.append(D.load_video(s.video, num_frames=frames, size=size))
                    batch.append(s)
                except D.VideoError as e:
                    missing += 1
                    tqdm.write(f"missing video, counted as skipped: {e}")
                    bar.update(1)
            if not batch:
                continue
            texts = generate(model, tok, [s.question for s in batch], torch.stack(pixels), max_new_tokens)
            for s, text in zip(batch, texts):
                pred = parse_answer(text, len(s.meta.get("options") or []) or 26, mode)
                answer = parse_answer(s.solution, 26, "reason" if "<answer>" in s.solution else "option")
                r = {"key": sample_key(s), "video": s.video, "answer": answer, "pred": pred,
                     "correct": pred is not None and pred == answer, "output": text, **{k: v for k, v in s.meta.items() if k == "task"}}
                records.append(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()
            bar.update(len(batch))
            correct = sum(r["correct"] for r in records)
            bar.set_postfix(acc=f"{correct / len(records):.3f}")
        bar.close()
    finally:
        if out:
            out.close()
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(len(records), 1), "correct": correct, "total": len(records),
            "unparsed": sum(r["pred"] is None for r in records), "missing_videos": missing, "records": records}


def sample_key(s):
    return f"{s.meta.get('line', '')}:{s.video}:{s.question}"


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Answer a question about a video, or score a multiple-choice set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--video", help="video file to ask about")
    p.add_argument("--question", help="the question")
    p.add_argument("--options", nargs="+", help="answer options, lettered A, B, C... in this order")
    p.add_argument("--mode", choices=["reason", "option"], default="reason",
                   help="reason: think in <think> tags, answer in <answer> tags; option: answer with the letter")
    p.add_argument("--eval", metavar="FILE.jsonl", help="score a multiple-choice file (video, question, options, answer)")
    p.add_argument("--root", help="directory the videos of --eval are relative to (default: the file's)")
    p.add_argument("--predictions", help="per-item predictions (JSONL), resumed if present (default: beside --eval)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together in --eval")
    p.add_argument("--frames", type=int, default=0, help="frames per video (0: the checkpoint's, else 16)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.eval and not (args.video and args.question):
            raise UsageError("give --video and --question, or --eval FILE.jsonl")
        model, tok = load(args.ckpt, args.device)
        frames = args.frames or default_frames(model)
        if args.eval:
            if not os.path.exists(args.eval):
                raise UsageError(f"--eval {args.eval}: no such file")
            samples = D.read_mc_jsonl(args.eval, args.root, mode=args.mode)
            preds = args.predictions or os.path.splitext(args.eval)[0] + f".{args.mode}.predictions.jsonl"
            res = evaluate(model, tok, samples, args.mode, preds, args.batch_size, frames, args.max_new_tokens)
            print(f"accuracy {res['accuracy']:.4f} ({res['correct']}/{res['total']}), unparsed {res['unparsed']}, "
                  f"missing videos {res['missing_videos']}; predictions in {preds}")
            return 0
        if not os.path.exists(args.video):
            raise UsageError(f"--video {args.video}: no such file")
        pixels = D.load_video(args.video, num_frames=frames, size=model.config.vision.image_size)
        question = D.mc_question(args.question, args.options, args.mode) if args.options else args.question
        for piece in stream(model, tok, question, pixels, args.max_new_tokens, args.temperature, args.top_k, args.top_p):
            print(piece, end="", flush=True)
        print()
        return 0
    except (UsageError, D.VideoError, D.DataError, M.CheckpointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
