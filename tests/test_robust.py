"""Trust under attack, crashes, divergence and misuse: nothing a user loads runs code, a crash at any point
of a checkpoint save resumes exactly, runs and predictions are never reused or overwritten by mistake,
divergence stops cleanly, and bad input is one line before any work starts (tiny model, CPU, seconds)."""

import glob
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data as D
import demo
import eval as E
import grpo as G
import model as M
import runs
import sample
import train
import weights as W
from conftest import mlvu, scripted
from test_train import run, task, weights  # noqa: F401 (task is a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line(capsys, prog="train.py"):
    """The one line of error on stderr (the progress bars of the run aside)."""
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip() and not re.search(r"\| *\d+/\d+ \[", s)]
    assert len(err) == 1 and err[0].startswith(prog + ": "), err
    return err[0]


# ----------------------------------------------------------------------------- 1. nothing loaded runs code


class Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))  # creates the flag file when unpickled


@pytest.mark.slow
def test_resume_never_unpickles(task, tmp_path):
    out, flag = tmp_path / "run", tmp_path / "pwned"
    run(task, out, steps=3, stop_after=1, compile=False)  # not about compiling: no compile to wait for
    ckpt = out / "checkpoint"
    with open(ckpt / "trainer_state.pt", "wb") as f:  # where the trainer state used to be read from
        pickle.dump({"step": Payload(str(flag))}, f)
    run(task, out, steps=3, resume=True, compile=False)
    assert not flag.exists(), "resuming ran code planted in the run folder"
    json.load(open(ckpt / "trainer_state.json"))  # the state is plain JSON plus safetensors
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("trainer_state")) == ["trainer_state.json",
                                                                                    "trainer_state.safetensors"]


# ----------------------------------------------------------------------------- 2. predictions are never another model's


def other_checkpoint(task, path, seed):
    cfg = W.from_pretrained(task["init"]).config
    torch.manual_seed(seed)
    model = M.TinyLLaVA(cfg)
    with torch.no_grad():  # far from the near-uniform initialisation, so that the two models answer differently
        for p in model.language_model.parameters():
            p.normal_(0, 1)
    W.save_pretrained(model, str(path))
    shutil.copy(os.path.join(task["init"], "tokenizer.json"), path / "tokenizer.json")
    return str(path)


def answers(path):
    return {r["key"]: r["output"] for r in map(json.loads, open(path)) if "key" in r}


@pytest.mark.slow
def test_eval_resumes_only_the_same_checkpoint_and_settings(task, tmp_path, capsys):
    a, b = other_checkpoint(task, tmp_path / "A", 1), other_checkpoint(task, tmp_path / "B", 2)
    shared, alone = str(tmp_path / "shared.jsonl"), str(tmp_path / "alone.jsonl")
    argv = ["--eval", task["test"], "--max-new-tokens", "5"]
    assert sample.main(["--ckpt", a, *argv, "--predictions", shared]) == 0
    first = answers(shared)
    assert sample.main(["--ckpt", b, *argv, "--predictions", alone]) == 0
    assert sample.main(["--ckpt", b, *argv, "--predictions", shared]) == 0
    assert answers(alone) != first, "the two models should answer differently for this test to mean anything"
    assert answers(shared) == answers(alone), "B after A must equal B alone"
    assert "another checkpoint or other settings" in capsys.readouterr().err
    assert answers(shared + ".stale") == first  # A's answers are kept aside, not lost
    assert sample.main(["--ckpt", b, *argv[:2], "--max-new-tokens", "3", "--predictions", shared]) == 0
    fresh = str(tmp_path / "fresh.jsonl")
    assert sample.main(["--ckpt", b, *argv[:2], "--max-new-tokens", "3", "--predictions", fresh]) == 0
    assert answers(shared) == answers(fresh) != answers(alone)


def test_bench_answers_are_redone_for_new_weights_or_settings(ckpt, tmp_path, monkeypatch, capsys):
    root, model = str(tmp_path / "MLVU"), str(tmp_path / "model")
    mlvu(root)
    shutil.copytree(ckpt, model)
    calls = []
    scripted(monkeypatch, {s.meta["task"]: "<answer>A</answer>" for s in E.read_mlvu(root, "reason")}, calls)
    argv = ["--ckpt", model, "--bench", "mlvu", "--root", root]
    assert sample.main(argv) == 0 and sum(calls) == 8
    calls.clear()
    assert sample.main(argv) == 0 and calls == []  # the same checkpoint and settings: all resumed
    W.save_pretrained(W.from_pretrained(model), model)  # new weights in the same place, as training writes them
    assert sample.main(argv) == 0 and sum(calls) == 8
    assert os.path.exists(os.path.join(model, "eval", "mlvu.reason.jsonl.stale"))
    calls.clear()
    assert sample.main([*argv, "--max-new-tokens", "7"]) == 0 and sum(calls) == 8
    calls.clear()
    assert sample.main([*argv, "--max-new-tokens", "7"]) == 0 and calls == []


# ----------------------------------------------------------------------------- 3. runs are not overwritten or mixed up


@pytest.mark.slow
def test_a_run_is_never_overwritten_or_resumed_by_mistake(task, tmp_path, capsys):
    out = tmp_path / "run"
    run(task, out, steps=2)
    metrics = open(out / "metrics.jsonl").read()
    shutil.copytree(out / "checkpoint", tmp_path / "before")
    base = ["--init", task["init"], "--data", task["grpo"], "--out", str(out), "--frames", "4", "--prompts-per-step", "2",
            "--micro-batch", "2", "--group-size", "3", "--max-new-tokens", "6", "--steps", "2", "--lr", "1e-3"]
    assert train.main(base) == 2
    assert "--overwrite" in one_line(capsys)
    assert open(out / "metrics.jsonl").read() == metrics and same_weights(out / "checkpoint", tmp_path / "before")
    assert train.main([*base[:5], str(tmp_path / "typo"), *base[6:], "--resume"]) == 2  # a mistyped OUT
    assert "no checkpoint" in one_line(capsys) and not (tmp_path / "typo" / "metrics.jsonl").exists()
    assert train.main([*base, "--resume", "--seed", "1", "--group-size", "4", "--stage", "sft"]) == 2
    msg = one_line(capsys)
    assert "--seed 0 (now 1)" in msg and "--group-size 3 (now 4)" in msg and "--stage grpo (now sft)" in msg
    assert train.main([*base, "--resume", "--data", task["coldstart"]]) == 2 and "--data" in one_line(capsys)
    assert train.main([*base[:-4], "--steps", "3", "--lr", "1e-3", "--resume"]) == 0  # more steps may be asked for
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert train.main([*base, "--overwrite"]) == 0
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------- 4. the demo has its own command line


def test_train_needs_data_and_the_demo_has_its_own_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "demo", lambda out, seed, device="", reward_reasoning=False: calls.append((out, seed, reward_reasoning)) or {})
    assert train.main(["--stage", "grpo", "--init", "X", "--steps", "2"]) == 2
    assert "--data" in one_line(capsys) and calls == []
    assert train.main([]) == 2 and "demo.py" in one_line(capsys) and calls == []
    with pytest.raises(SystemExit) as e:
        train.main(["--demo"])
    assert e.value.code == 2 and calls == []
    capsys.readouterr()
    assert demo.main([]) == 0 and demo.main(["--seed", "3", "--out", "x", "--reward-reasoning"]) == 0
    assert calls == [("runs/demo", 0, False), ("x", 3, True)]
    with pytest.raises(SystemExit) as e:
        demo.main(["--steps", "3"])
    assert e.value.code == 2 and "--steps" in one_line(capsys, "demo.py")
    assert "import demo" not in open(train.__file__).read()  # no circle, not even inside a function


# ----------------------------------------------------------------------------- 5. divergence


def finite_checkpoint(path):
    return all(torch.isfinite(v).all() for v in weights(path).values())


@pytest.mark.parametrize("stage", ["sft", "grpo"])
@pytest.mark.slow
def test_divergence_stops_cleanly_and_keeps_the_last_good_checkpoint(task, tmp_path, stage, capsys):
    out = tmp_path / stage
    with pytest.raises(train.Diverged, match="5 non-finite steps in a row"):
        run(task, out, stage=stage, lr=1e10, steps=20, max_grad_norm=0, warmup=0)
    assert finite_checkpoint(out / "checkpoint")
    rows = [json.loads(r) for r in open(out / "metrics.jsonl")]
    assert rows[-1]["nan_steps"] >= 5 and len(rows) < 20
    with pytest.raises(train.Diverged):  # resuming the same run diverges the same way, cleanly
        run(task, out, stage=stage, lr=1e10, steps=20, max_grad_norm=0, warmup=0, resume=True)
    argv = ["--stage", stage, "--init", task["init"], "--data", task["grpo"], "--out", str(tmp_path / "cli"),
            "--frames", "4", "--prompts-per-step", "2", "--micro-batch", "2", "--group-size", "3",
            "--max-new-tokens", "6", "--steps", "20", "--lr", "1e10", "--max-grad-norm", "0", "--warmup", "0"]
    capsys.readouterr()
    assert train.main(argv) == 1 and "diverged" in one_line(capsys)


def test_nonfinite_logits_stop_the_rollout_clearly(task):
    model = W.from_pretrained(task["init"], dtype=torch.float32)
    tok = D.Tokenizer(task["init"])
    with torch.no_grad():
        model.language_model.model.norm.weight.fill_(float("nan"))
    ids = torch.tensor([tok.prompt_ids("What colour?")])
    video = model.encode_video(torch.zeros(1, 4, 3, 16, 16))
    with pytest.raises(FloatingPointError, match="non-finite"):
        G.rollout(model, ids, video, tok.eos_id, group_size=3, max_new_tokens=5)
    tokens, _ = G.sample_token(torch.full((2, 7), float("nan")))  # no crash inside multinomial
    assert tokens.shape == (2,)


def test_grpo_rejects_temperature_zero(task, tmp_path, capsys):
    argv = ["--init", task["init"], "--data", task["grpo"], "--out", str(tmp_path / "t0"), "--temperature", "0"]
    assert train.main(argv) == 2 and "--temperature" in one_line(capsys)
    assert train.main([*argv[:-1], "-1", "--stage", "sft"]) == 2 and "--temperature" in one_line(capsys)


# ----------------------------------------------------------------------------- 6. crashes at any point of a save


class Crash(BaseException):
    """A kill -9 at this point: nothing after it runs, no cleanup either."""


FS_OPS = [(os, "rename"), (os, "replace"), (shutil, "rmtree"), (shutil, "copy"), (shutil, "copy2"),
          (shutil, "copytree"), (W, "_write_json"), (runs, "save_file"), (W.tempfile, "mkdtemp")]


def crash_at(monkeypatch, k):
    """Make the k-th file-system operation inside train.write_checkpoint (and every one after it) a crash."""
    count, real_write = [0], train.write_checkpoint
    armed = [False]

    def wrap(fn):
        def op(*a, **kw):
            if armed[0]:
                count[0] += 1
                if count[0] >= k:
                    raise Crash
            return fn(*a, **kw)
        return op

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file))
    for mod, name in FS_OPS:
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))

    def write(*a, **kw):
        armed[0] = True
        try:
            return real_write(*a, **kw)
        finally:
            armed[0] = False

    monkeypatch.setattr(train, "write_checkpoint", write)
    return count


@pytest.mark.slow
def test_a_crash_at_every_point_of_a_save_resumes_exactly(task, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run(task, straight, steps=3)
    start = tmp_path / "start"
    run(task, start, steps=3, stop_after=1)
    os.makedirs(start / "checkpoint" / "eval")  # what sample.py --bench writes beside the weights
    open(start / "checkpoint" / "eval" / "mvbench.reason.jsonl", "w").write("{}\n")
    k = 1
    while True:
        out = tmp_path / f"crash{k}"
        shutil.copytree(start, out)
        with monkeypatch.context() as m:
            count = crash_at(m, k)
            try:
                run(task, out, steps=3, stop_after=2, resume=True)
                crashed = False
            except Crash:
                crashed = True
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 9, "lo')  # the kill also cut the metrics' last line
        run(task, out, steps=3, resume=True)
        assert same_weights(out / "checkpoint", straight / "checkpoint"), f"crash point {k}"
        assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == [1, 2, 3]
        assert sorted(os.listdir(out)) == [".lock", "checkpoint", "curves.png", "metrics.jsonl"], f"crash point {k}"
        assert os.path.exists(out / "checkpoint" / "eval" / "mvbench.reason.jsonl"), f"crash point {k}"
        if not crashed:
            break
        k += 1
    assert k >= 8 and count[0] >= 8  # every operation of the save was a crash point once


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_identical_weights(task, tmp_path):
    straight = tmp_path / "straight"
    args = dict(steps=6, prompts_per_step=2, micro_batch=1, group_size=3, max_new_tokens=6, save_every=1)
    run(task, straight, compile=False, **args)  # not about compiling: every relaunch would compile again
    out = tmp_path / "killed"
    argv = [sys.executable, "train.py", "--init", task["init"], "--data", task["grpo"], "--out", str(out), "--frames", "4",
            "--lr", "1e-3", "--seed", "0", "--no-compile", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the straight run's sums, bit for bit
    rng, kills = random.Random(0), 0
    while True:
        resume = ["--resume"] if runs.find_checkpoint(str(out)) else ["--overwrite"]
        p = subprocess.Popen(argv + resume, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            while not os.path.exists(out / "metrics.jsonl") and p.poll() is None:
                time.sleep(0.02)  # let it get past the imports, then kill it somewhere in the steps
            time.sleep(rng.uniform(0, 0.3))
            p.send_signal(signal.SIGKILL)  # (a run that already finished is left as it is)
        _, err = p.communicate()
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        kills += 1
    assert kills >= 1
    assert same_weights(out / "checkpoint", straight / "checkpoint")
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == list(range(1, 7))
    assert not glob.glob(str(out / ".tmp-save-*")) and not glob.glob(str(out / "checkpoint.*"))


# ----------------------------------------------------------------------------- 7. bad rows are caught when read


@pytest.mark.slow
def test_bad_bytes_image_tags_and_a_bom_are_handled_when_read(task, tmp_path):
    good = open(task["grpo"], encoding="utf-8").read().splitlines()
    tagged = json.dumps(dict(json.loads(good[2]), problem="<image>\nWhat colour is the square?"))
    path = tmp_path / "rows.jsonl"
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + good[0].encode() + b"\n")  # a UTF-8 byte-order mark before the first row
        f.write(good[1].encode()[:-3] + b"\xff\xfe\"}\n")  # not UTF-8
        f.write(tagged.encode() + b"\n" + good[3].encode() + b"\n")
    samples, bad = D.read_samples(str(path), os.path.dirname(task["grpo"]), errors="skip")
    assert [s.meta["line"] for s in samples] == [1, 4]
    assert len(bad) == 2 and "UTF-8" in bad[0] and "<image>" in bad[1] and ":2:" in bad[0] and ":3:" in bad[1]
    m = run(task, tmp_path / "run", data=str(path), root=os.path.dirname(task["grpo"]), steps=2)  # trains on what is left, no error mid-run
    assert m["skipped_rows"] == 2
    cold = tmp_path / "cold.json"
    cold.write_bytes(b"\xef\xbb\xbf" + open(task["coldstart"], "rb").read())
    assert len(D.read_samples(str(cold))[0]) == len(D.read_samples(task["coldstart"])[0])


# ----------------------------------------------------------------------------- 8. one-line errors before work starts


TRAIN_BASE = ["--data", "DATA", "--init", "INIT"]


@pytest.mark.parametrize("flags,word", [
    (["--group-size", "1"], "--group-size"), (["--frames", "0"], "--frames"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--save-every", "0"], "--save-every"), (["--steps", "-1"], "--steps"), (["--prompts-per-step", "-1"], "--prompts-per-step"),
    (["--micro-batch", "-2"], "--micro-batch"), (["--schedule", "linear"], "--schedule"), (["--vision", "V"], "--init"),
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--scale", "x"], "--scale"),
    (["--loss-type", "x"], "--loss-type"), (["--lr", "-1"], "--lr"), (["--epochs", "0"], "--epochs"),
    (["--stage", "rl"], "--stage"), (["--connector", "x"], "--connector"), (["--warmup", "2"], "--warmup"),
    (["--root", "/no/such/dir"], "--root"), (["--steps", "x"], "--steps"), (["--init", "o/checkpoint"], "--init"),
])
def test_train_flags_are_checked_first(task, tmp_path, capsys, flags, word):
    argv = [task["grpo"] if a == "DATA" else task["init"] if a == "INIT" else a for a in TRAIN_BASE]
    flags = [str(tmp_path / f) if f.startswith("o/") else f for f in flags]
    try:
        code = train.main([*argv, "--out", str(tmp_path / "o"), *flags])
    except SystemExit as e:  # argparse's own checks (a type) exit from inside, with code 2
        code = e.code
    assert code == 2
    assert word in one_line(capsys) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,word", [
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--frames", "-1"], "--frames"), (["--batch-size", "-1"], "--batch-size"),
    (["--temperature", "-1"], "--temperature"), (["--top-p", "1.5"], "--top-p"), (["--top-k", "-1"], "--top-k"),
])
def test_sample_flags_are_checked_first(task, capsys, flags, word):
    assert sample.main(["--ckpt", task["init"], "--eval", task["test"], *flags]) == 2
    assert word in one_line(capsys, "sample.py")


def broken(task, tmp_path, how):
    path = tmp_path / how
    shutil.copytree(task["init"], path)
    st = path / "model.safetensors"
    if how == "truncated":
        st.write_bytes(st.read_bytes()[:1000])
    elif how == "garbage":
        st.write_bytes(b"\x00" * 16 + os.urandom(200))
    elif how == "config_list":
        (path / "config.json").write_text("[1, 2]")
    elif how == "config_types":
        cfg = json.load(open(path / "config.json"))
        (path / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "hidden_size": "big"}}))
    elif how == "small_vocab":
        cfg = json.load(open(path / "config.json"))
        (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100, "text_config": {**cfg["text_config"], "vocab_size": 100}}))
        model = M.TinyLLaVA(M.TinyLLaVAConfig.from_dict(json.load(open(path / "config.json"))))
        W.save_pretrained(model, str(path))
    elif how == "nan":
        model = W.from_pretrained(str(path))
        with torch.no_grad():
            model.connector.parameters().__next__().fill_(float("nan"))
        W.save_pretrained(model, str(path))
    return str(path)


@pytest.mark.parametrize("how,word", [("truncated", "model.safetensors"), ("garbage", "model.safetensors"),
                                      ("config_list", "config.json"), ("config_types", "config.json"),
                                      ("small_vocab", "tokenizer"), ("nan", "non-finite")])
def test_bad_checkpoints_are_one_line_in_both_tools(task, tmp_path, capsys, how, word):
    ckpt = broken(task, tmp_path, how)
    capsys.readouterr()
    assert sample.main(["--ckpt", ckpt, "--eval", task["test"], "--max-new-tokens", "3"]) == 2
    assert word in one_line(capsys, "sample.py")
    argv = ["--init", ckpt, "--data", task["grpo"], "--out", str(tmp_path / "o"), "--frames", "4", "--steps", "1"]
    assert train.main(argv) == 2
    assert word in one_line(capsys)


def test_bad_data_is_one_line(task, tmp_path, capsys):
    argv = ["--init", task["init"], "--out", str(tmp_path / "o"), "--frames", "4", "--steps", "1"]
    assert train.main([*argv, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in one_line(capsys)
    (tmp_path / "list.json").write_text("{}")
    assert train.main([*argv, "--data", str(tmp_path / "list.json")]) == 2
    assert "list.json" in one_line(capsys)
