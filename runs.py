"""The run folder: a checkpoint that survives a crash at any moment, the trainer state without pickle,
and the metrics log.

    OUT/metrics.jsonl     one JSON line per optimizer step (a line a kill cut short is ignored)
    OUT/curves.png        the metrics drawn (train.py redraws it every step)
    OUT/checkpoint/       weights in the published layout, tokenizer files, trainer_state.{json,safetensors}

A checkpoint is written beside the old one as checkpoint.tmp, its trainer_state.json last: that file marks
it complete. `find_checkpoint` then swaps it in, and at start-up finishes whatever swap a crash interrupted,
so some complete checkpoint always survives. The trainer state (optimizer, scheduler, RNG, data position,
the run's settings) is JSON and safetensors: resuming a run executes nothing from the run folder.
One writer at a time (OUT/.lock), a stop on SIGTERM that saves, and a full disk met in one line: docs/runs.md.
"""

import fcntl
import functools
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
from dataclasses import asdict

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import data
from weights import save_pretrained


class RunError(Exception):
    """Bad flags, data, checkpoint or run folder: reported in one line (exit code 2) before any work."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, any OSError): the run ends in one line (exit code 1)."""


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run after a step, saved (exit code 128 + the signal's number: the job is not done)."""

    def __init__(self, name, step, out):
        super().__init__(f"stopped by {name} at step {step}; checkpoint saved in {out}; --resume to continue")
        self.signum = signal.Signals[name].value


_held, _stop = {}, {}  # lock path -> its open file while this process writes there; "signal" -> the first stop signal


def hold(lock, what):
    """One writer: an exclusive flock on `lock` (OUT/.lock, PREDICTIONS.lock) naming its holder, until release() or
    the holder's death (kill -9 too: no stale lock). Else RunError naming the holder, having written nothing."""
    if os.path.abspath(lock) not in _held:
        f = open(lock, "a+")  # created if missing, not truncated: the holder's name stays readable
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunError(f"{what} is in use by {f.read().strip() or 'another process'}: one writer at a time (wait "
                           "for it to end, or stop it with SIGTERM: a run saves, then stops)") from None
        f.truncate(0), f.write(f"pid {os.getpid()} on {socket.gethostname()}\n"), f.flush()
        _held[os.path.abspath(lock)] = f


def release(lock=None):
    """Let go of one lock (a path given to hold), or of all this process holds."""
    for path in [os.path.abspath(lock)] if lock else list(_held):
        _held.pop(path).close() if path in _held else None


def releasing_locks(fn):
    """fn, letting go of the locks it took when it returns or raises: an in-process caller (the demo, a test) goes on."""
    @functools.wraps(fn)
    def call(*args, **kw):
        before = set(_held)
        try:
            return fn(*args, **kw)
        finally:
            for lock in set(_held) - before:
                release(lock)
    return call


def catch_stop_signals(previous=None):
    """SIGTERM (schedulers, spot instances) and SIGINT set a flag the loop reads after each step, to save and stop; a
    second signal changes nothing. -> the previous handlers, which catch_stop_signals(previous) puts back."""
    _stop.clear()
    ask = lambda signum, frame: _stop.setdefault("signal", signal.Signals(signum).name)  # noqa: E731
    return {s: signal.signal(s, (previous or {}).get(s, ask)) for s in (signal.SIGTERM, signal.SIGINT)}


def stop_requested():
    return _stop.get("signal")  # the first stop signal's name ("SIGTERM"), or None


def human(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def checkpoint_bytes(model, tokenizer_files):
    """One checkpoint on disk: the weights as stored, AdamW's two fp32 moments per trainable number, the tokenizer."""
    return (sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(map(os.path.getsize, tokenizer_files))
            + 8 * sum(p.numel() for p in model.parameters() if p.requires_grad))


def check_room(out, need, save_every, twice):
    """Refuse a run whose next checkpoint (`need` bytes) cannot fit on OUT's disk, warn when a new run's second one
    (`twice`: it saves again) cannot: each is written beside the last, which goes once the new one is complete."""
    free = shutil.disk_usage(out).free
    if free < need:
        raise RunError(f"{out}: a checkpoint needs {human(need)}, its disk has {human(free)} free: free some space "
                       "or choose another --out")
    if twice and free < 2 * need:
        print(f"warning: {out}: {human(free)} free holds one checkpoint ({human(need)}), not a second one beside it "
              f"(--save-every {save_every}): the run will stop at its second save, keeping the first", file=sys.stderr)


def save_state(state, directory):
    """The trainer state as trainer_state.safetensors (its tensors) and trainer_state.json (the rest; dicts as
    [key, value] pairs, keeping the optimizer's integer keys), the JSON last: it marks a complete checkpoint."""
    tensors, seen, path = {}, {}, os.path.join(directory, "trainer_state")

    def pack(x):
        if isinstance(x, torch.Tensor):  # a tensor met twice (rank 0's RNG state, say) is stored once
            key = seen.setdefault(id(x), str(len(seen)))
            tensors[key] = x.detach().cpu().contiguous()
            return {"tensor": key}
        return {"dict": [[k, pack(v)] for k, v in x.items()]} if isinstance(x, dict) else [pack(v) for v in x] if isinstance(x, (list, tuple)) else x

    packed = pack(state)
    save_file(tensors, path + ".safetensors")
    with open(path + ".json.part", "w") as f:
        json.dump(packed, f)
    os.replace(path + ".json.part", path + ".json")


def load_state(directory, tensors=True):
    path = os.path.join(directory, "trainer_state")
    tensors = load_file(path + ".safetensors") if tensors else {}

    def unpack(x):
        if isinstance(x, dict):
            return tensors.get(x["tensor"]) if "tensor" in x else {k: unpack(v) for k, v in x["dict"]}
        return [unpack(v) for v in x] if isinstance(x, list) else x

    with open(path + ".json") as f:
        return unpack(json.load(f))


def write_checkpoint(model, tokenizer_files, state, out, weights=None, need=0):
    """OUT/checkpoint, written beside it as checkpoint.tmp, then swapped in by `find_checkpoint`.
    weights: the model's tensors gathered whole (FSDP), else the model's own. A save that fails (a full disk, any
    OSError) removes its partial files and raises SaveFailed naming `need` (bytes), what is free and the step kept."""
    tmp = os.path.join(out, "checkpoint.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, state_dict=weights)
        for f in tokenizer_files:
            shutil.copy(f, os.path.join(tmp, os.path.basename(f)))
        save_state(state, tmp)
        find_checkpoint(out)
    except (OSError, SafetensorError) as e:
        last = find_checkpoint(out)  # removes the partial copies; a complete checkpoint.tmp would become the last
        kept = f"step {load_state(last, tensors=False)['step']} in {last} is intact" if last else "no checkpoint yet"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SaveFailed(f"saving step {state['step']} failed ({reason}): a checkpoint needs {human(need)}, "
                         f"{human(shutil.disk_usage(out).free)} free in {out}; {kept} (free space, then --resume)") from None


def find_checkpoint(out):
    """OUT/checkpoint or None, once any save a kill cut short is finished: a complete checkpoint.tmp is the newest
    and is swapped in (with eval/ and the like from beside the old weights); .old stands in for a missing
    checkpoint; partial copies (.tmp-save-* of a weights save, an unfinished .tmp) are removed."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    complete = lambda d: os.path.exists(os.path.join(d, "trainer_state.json"))  # noqa: E731
    for partial in glob.glob(os.path.join(out, ".tmp-save-*")):
        shutil.rmtree(partial, ignore_errors=True)
    if complete(tmp):
        if os.path.exists(final):
            for name in set(os.listdir(final)) - set(os.listdir(tmp)):
                if not name.startswith(("model", "trainer_state")):
                    os.rename(os.path.join(final, name), os.path.join(tmp, name))
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
    elif not complete(final) and complete(old):
        os.rename(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final if complete(final) else None


def prepare_out(cfg, may_change=()):
    """-> the checkpoint to resume from, or None for a new run. Refuses to overwrite a run without --overwrite, to
    resume without a checkpoint, and to resume with other settings than `may_change` (naming them). First takes
    OUT's lock (a mistyped OUT with --resume is refused, not made)."""
    ckpt = None
    if os.path.isdir(cfg.out) or not cfg.resume:
        os.makedirs(cfg.out, exist_ok=True)
        hold(os.path.join(cfg.out, ".lock"), f"run folder {cfg.out}")
        ckpt = find_checkpoint(cfg.out)
    held = [n for n in ("metrics.jsonl", "checkpoint") if os.path.exists(os.path.join(cfg.out, n))]
    if not cfg.resume:
        if held and not cfg.overwrite:
            raise RunError(f"{cfg.out} holds a run ({', '.join(held)}): --resume to continue it, --overwrite to start over")
        shutil.rmtree(os.path.join(cfg.out, "checkpoint"), ignore_errors=True)
        return None
    if not ckpt:
        raise RunError(f"--resume: no checkpoint in {cfg.out} (a new run needs no --resume)")
    saved = load_state(ckpt, tensors=False)["config"]
    diff = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in asdict(cfg).items()
            if k in saved and k not in may_change and saved[k] != v]
    if diff:
        raise RunError(f"{ckpt} was trained with other settings: {', '.join(diff)}; resume with the same ones, "
                       "or start over with --overwrite")
    return ckpt


def tokenizer_file(directory):
    """The tokenizer files of a directory, copied into each checkpoint: tokenizer.json and/or the slow ones."""
    paths = [os.path.join(directory, f) for f in data.TOKENIZER_FILES if os.path.exists(os.path.join(directory, f))]
    names = {os.path.basename(p) for p in paths}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise RunError(f"no tokenizer.json (nor vocab.json and merges.txt) in {directory}")
    return paths


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path, upto=None):
    if not os.path.exists(path):
        return []
    with open(path) as f:  # a line a kill cut short has no newline (json.dumps writes none inside a record)
        rows = [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def run_budget(seconds, records, done, total):
    """What the rest of the run will cost, from steps 2 and 3 of this process (step 1 compiles)."""
    per = float(np.median(seconds[1:]))
    phases = [k for k in ("time/rollout", "time/reference", "time/policy") if k in records[-1]]
    split = ", ".join(f"{k[5:]} {np.median([r[k] for r in records[-2:]]):.2f} s" for k in phases)
    hours = lambda s: f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"
    return (f"run budget: {per:.2f} s per step" + (f" ({split})" if split else "") +
            f"; {total} steps ~{hours(per * total)} in all, ~{hours(per * (total - done))} to go "
            f"(step 1 took {seconds[0]:.1f} s, compiling included)")


def plot_curves(records, path, keys, width=640, panel=110, smooth=0.9):
    """Small multiples drawn with OpenCV: one panel per metric in `keys` against the step, the raw values
    faint and their exponential moving average (weight `smooth`, debiased) bold, each panel with its own
    y range written on it and the steps on its x axis."""
    if not records:
        return
    s0, s1 = records[0]["step"], max(records[-1]["step"], records[0]["step"] + 1)
    left, right, head, foot = 62, 16, 24, 26  # margins around each panel's plot box
    img = np.full((len(keys) * (head + panel + foot) + 8, width, 3), 255, np.uint8)
    colours = [(180, 90, 20), (40, 140, 40), (30, 30, 200), (150, 40, 150), (20, 130, 190)]
    text = lambda s, x, y, scale=0.42, c=(70, 70, 70): cv2.putText(img, s, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, c, 1, cv2.LINE_AA)
    xs = lambda s: left + (np.asarray(s) - s0) / (s1 - s0) * (width - left - right)
    for i, key in enumerate(keys):
        top, colour = i * (head + panel + foot) + head, colours[i % len(colours)]
        cv2.rectangle(img, (left, top), (width - right, top + panel), (200, 200, 200), 1)
        text(key, left, top - 7, 0.5, colour)
        for s in (s0, (s0 + s1) // 2, s1):
            text(str(s), min(xs(s) - 4 * len(str(s)), width - 9 * len(str(s)) - 4), top + panel + 17)
        pts = np.array([(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])])
        if not len(pts):
            continue
        ema = [0.0]
        for v in pts[:, 1]:
            ema.append(smooth * ema[-1] + (1 - smooth) * v)
        ema = np.array(ema[1:]) / (1 - smooth ** np.arange(1, len(pts) + 1))  # debiased: no pull towards 0 at the start
        lo, hi = pts[:, 1].min(), pts[:, 1].max()
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        text(f"{hi:.3g}", 4, top + 10), text(f"{lo:.3g}", 4, top + panel), text(f"smoothed, last: {ema[-1]:.3g}", width - right - 170, top - 7)
        for values, c, thick in ((pts[:, 1], tuple(int(c + (255 - c) * 0.7) for c in colour), 1), (ema, colour, 2)):
            xy = np.stack([xs(pts[:, 0]), top + panel - (values - lo) / (hi - lo) * panel], 1)
            cv2.polylines(img, [np.round(xy).astype(np.int32)], False, c, thick, cv2.LINE_AA)
    text("step", width - right - 30, img.shape[0] - 4)
    cv2.imwrite(path, img)
