"""The run folder under faults (runs.py, docs/runs.md): one writer at a time for a run folder and a predictions file,
a polite stop on SIGTERM that resumes exactly, no stale lock after kill -9, and a full disk met in one line, at the
start or in a save. The first writer is a real process; the second runs in this one (it needs no start-up time), so
it meets the first while the first is surely working. Waits are for a condition (a metrics line), never a fixed time."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError

import model as M
import weights as W
import runs
import sample
import train
from test_robust import REPO, one_line, same_weights
from test_train import task, weights  # noqa: F401 (task is a fixture)


def flags(task, out, **kw):
    """train.py's flags for a tiny SFT run (1000 steps: it runs until stopped)."""
    base = dict(stage="sft", init=task["init"], data=task["coldstart"], out=str(out), frames=4, lr=1e-3,
                prompts_per_step=2, micro_batch=2, steps=1000, save_every=1, seed=0)
    return [f"--{k.replace('_', '-')}={v}" for k, v in {**base, **kw}.items()]


def start(script, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # this process's sums, bit for bit (one
    # thread, as the `one_thread` fixture sets: tiny ops on a busy machine run faster on one)
    return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, p, timeout=300):
    t = time.time()
    while not condition():
        assert p.poll() is None, f"exited with {p.returncode}: {p.stderr.read()[-2000:]}"
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def steps(out):
    return [r["step"] for r in runs.read_jsonl(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_one_writer_per_run_folder_a_polite_stop_and_no_stale_lock(task, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    first = start("train.py", flags(task, out, save_every=1000))  # no checkpoint but the one the stop saves
    wait_for(lambda: len(steps(out)) >= 2, first)
    owner = f"pid {first.pid} on {socket.gethostname()}\n"
    for extra in ([], ["--resume"], ["--overwrite"]):  # a relaunch that believed the first dead
        assert train.main(flags(task, out) + extra) == 2
        assert f"in use by pid {first.pid} on" in one_line(capsys)
        assert open(out / ".lock").read() == owner  # the second wrote nothing, not even its name
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]  # after the progress bar's \r-separated updates
    m = re.fullmatch(r"train\.py: stopped by SIGTERM at step (\d+); checkpoint saved in \S+; --resume to continue", last)
    assert m, err[-2000:]
    k = int(m.group(1))
    assert steps(out) == list(range(1, k + 1))  # in order: the relaunches neither wrote nor deleted
    assert runs.load_state(out / "checkpoint", tensors=False)["step"] == k
    weights(out / "checkpoint")

    second = start("train.py", flags(task, out) + ["--resume"])  # the first has ended: the folder is free
    wait_for(lambda: len(steps(out)) >= k + 2, second)
    second.kill()
    second.wait()
    # what a resume starts from: a kill between a finished checkpoint.tmp and its swap leaves the newer one there
    j = runs.load_state(runs.find_checkpoint(str(out)), tensors=False)["step"]
    assert train.main(flags(task, out, stop_after=j + 1) + ["--resume"]) == 0  # at once: kill -9 left no lock
    assert steps(out) == list(range(1, j + 2))
    assert train.main(flags(task, tmp_path / "straight", stop_after=j + 1)) == 0
    assert same_weights(out / "checkpoint", tmp_path / "straight" / "checkpoint")  # SIGTERM and kill -9 cost nothing


@pytest.mark.slow
def test_one_writer_per_predictions_file(task, tmp_path, capsys, one_thread):
    rows = open(task["test"]).read().splitlines() * 8  # long enough to outlast the second's start
    big, preds = tmp_path / "big.jsonl", tmp_path / "preds.jsonl"
    big.write_text("\n".join(rows) + "\n")
    argv = ["--ckpt", task["init"], "--eval", str(big), "--root", os.path.dirname(task["test"]), "--predictions",
            str(preds), "--max-new-tokens", "8", "--batch-size", "1"]
    first = start("sample.py", argv)
    wait_for(lambda: preds.exists() and preds.read_text().count("\n") >= 1, first)
    assert sample.main(argv) == 2
    assert f"in use by pid {first.pid} on" in one_line(capsys, "sample.py")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == len(rows) == len({r["key"] for r in records})  # every item once, no line of the second


def full_disk_at(monkeypatch, where):
    """The second checkpoint's save meets a full disk at `where`, after writing part of a file."""
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # as it says
    module, name, err = {"weights": (W, "save_file", full), "state": (runs, "save_file", full),
                         "tokenizer": (shutil, "copy", OSError(28, "No space left on device"))}[where]
    real, calls = getattr(module, name), []

    def write(a, path, *rest, **kw):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise err
        return real(a, path, *rest, **kw)
    monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize("where", ["weights", "tokenizer", "state"])
def test_a_save_that_meets_a_full_disk_ends_the_run_in_one_line(task, tmp_path, monkeypatch, capsys, one_thread, where):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        full_disk_at(m, where)
        assert train.main(flags(task, out, steps=3)) == 1
    line = one_line(capsys)
    assert re.search(r"saving step 2 failed \(.*No space left on device.*\): a checkpoint needs [\d.]+ MB, [\d.]+ [MG]B "
                     r"free in \S+; step 1 in \S+checkpoint is intact", line), line
    assert sorted(os.listdir(out)) == [".lock", "checkpoint", "curves.png", "metrics.jsonl"]  # no partial files
    assert runs.load_state(out / "checkpoint", tensors=False)["step"] == 1
    assert steps(out) == [1, 2]
    assert train.main(flags(task, out, steps=3) + ["--resume"]) == 0 and steps(out) == [1, 2, 3]  # once there is room


def test_the_start_refuses_a_disk_that_cannot_hold_a_checkpoint(task, tmp_path, monkeypatch, capsys, one_thread):
    model = W.from_pretrained(task["init"])
    train.freeze_vision(model)
    need = runs.checkpoint_bytes(model, [os.path.join(task["init"], "tokenizer.json")])
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need - 1))
        assert train.main(flags(task, out, steps=2)) == 2
        assert re.search(rf"a checkpoint needs {need / 1e6:.1f} MB, its disk has {(need - 1) / 1e6:.1f} MB free",
                         one_line(capsys))
        assert sorted(os.listdir(out)) == [".lock"]  # refused before any step
        m.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need * 3 // 2))
        assert train.main(flags(task, out, steps=2)) == 0
        warning = [s for s in capsys.readouterr().err.splitlines() if s.startswith("warning:")]
        assert len(warning) == 1 and "not a second one beside it (--save-every 1)" in warning[0], warning
        assert train.main(flags(task, out, steps=3) + ["--resume"]) == 0  # one more fits beside the last: no warning
        assert not [s for s in capsys.readouterr().err.splitlines() if s.startswith("warning:")]
    on_disk = sum(os.path.getsize(out / "checkpoint" / f) for f in os.listdir(out / "checkpoint"))
    assert 0.9 * on_disk < need < 1.1 * on_disk, (need, on_disk)  # the estimate is what a save writes


def unshare_works():
    return shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="no user namespaces here to mount a tiny tmpfs (the patched tests above "
                                                 "still run)")
def test_a_real_full_disk_a_tiny_tmpfs(task, tmp_path):
    """A tmpfs of 1.5 checkpoints, mounted in a user namespace: the start warns, the second save fails in one line
    leaving the first, and a resume is refused at the start (no room for one more beside it)."""
    model = W.from_pretrained(task["init"])
    train.freeze_vision(model)
    need = runs.checkpoint_bytes(model, [os.path.join(task["init"], "tokenizer.json")])
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    os.makedirs(mnt)
    cmd = " ; ".join([f"mount -t tmpfs -o size={need * 3 // 2} tmpfs {mnt} || exit 99",
                      " ".join([sys.executable, "train.py", *flags(task, mnt / "run", steps=3)]), "echo rc=$? >&2",
                      " ".join([sys.executable, "train.py", *flags(task, mnt / "run", steps=3), "--resume"]),
                      "echo rc=$? >&2", f"cp -a {mnt / 'run'} {kept}"])
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = [s for s in r.stderr.splitlines() if not re.search(r"\| *\d+/\d+ \[", s) and s.strip()]
    assert r.returncode == 0 and len(err) == 5, r.stderr[-3000:]
    assert err[0].startswith("warning:") and "not a second one beside it" in err[0]
    assert re.match(r"train\.py: saving step 2 failed \(.*No space left on device.*\).* step 1 in \S+ is intact", err[1]), err[1]
    assert err[2] == "rc=1" and err[4] == "rc=2"
    assert re.match(r"train\.py: \S+: a checkpoint needs .* free: free some space", err[3]), err[3]
    assert sorted(os.listdir(kept)) == [".lock", "checkpoint", "curves.png", "metrics.jsonl"]
    assert runs.load_state(kept / "checkpoint", tensors=False)["step"] == 1
    weights(kept / "checkpoint")
