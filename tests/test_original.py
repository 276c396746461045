"""The original evaluation protocol (eval.py, sample.py --protocol original) on miniature copies of the four
benchmarks' layouts (built by test_bench_eval's helpers: frame i of every video is gray 20*i): each prompt
byte for byte, the answer parser on its edge cases, the frames per MVBench task type worked out by hand,
and sampled, seeded, repeatable runs end to end on a tiny model."""

import json
import os

import pytest

import data as D
import eval as E
import sample
from test_bench_eval import ckpt, dump, frame_ids, mlvu, mmvu, mvbench, run, videomme  # noqa: F401 (ckpt: a fixture)

SUFFIX = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def by(samples, **meta):
    return next(s for s in samples if all(s.meta.get(k) == v for k, v in meta.items()))


# ----------------------------------------------------------------------------- prompts, byte for byte


def test_mvbench_prompt(tmp_path):
    root = str(tmp_path / "MVBench")
    mvbench(root)
    dump(f"{root}/json/action_antonym.json", [{"video": "1.gif", "question": "What did he do? ",
                                               "candidates": ["stop", "go \n"], "answer": "go \n"}])
    samples = E.read_mvbench(root, "reason", "original")
    s = by(samples, task="Action Sequence")
    assert D.build_prompt(s.question) == (
        SYSTEM + " USER: <image>\nAction Sequence?\nOptions:\nA. red\nB. blue\nC. green\n" + SUFFIX + " ASSISTANT:")
    assert s.solution == "B" and s.meta["choices"] == ["A", "B", "C"]
    # only the end of the whole body is stripped (the question's own trailing space stays)
    assert by(samples, task="Action Antonym").question == "What did he do? \nOptions:\nA. stop\nB. go\n" + SUFFIX
    clean = by(E.read_mvbench(root, "reason"), task="Action Sequence")  # the clean protocol is unchanged
    assert clean.question == "Action Sequence?\nA. red\nB. blue\nC. green\n" + SUFFIX and "choices" not in clean.meta


def test_videomme_mlvu_mmvu_prompts(tmp_path):
    videomme(str(tmp_path / "vm"))
    s = E.read_videomme(str(tmp_path / "vm"), "reason", "original")[2]
    assert s.question == "q2\nOptions:\nA. one.\nB. two.\nC. three.\nD. four.\n" + SUFFIX
    assert s.solution == "C" and s.meta["choices"] == ["A", "B", "C", "D"]

    mlvu(str(tmp_path / "mlvu"))
    s = E.read_mlvu(str(tmp_path / "mlvu"), "reason", "original")[1]
    assert s.question == "plotQA 1\n(A) yes\n(B) no\n" + SUFFIX and s.solution == "A"

    mmvu(str(tmp_path / "mmvu"))
    path = str(tmp_path / "mmvu" / "validation.json")
    items = json.load(open(path))
    items[2]["choices"] = {"A": "oil", "B": "", "C": "ink"}  # an empty choice is still listed, as the original did
    items[2]["answer"] = "C"
    dump(path, items)
    first, second, _ = E.read_mmvu(str(tmp_path / "mmvu"), "reason", "original")
    assert first.question == "How many grams?\nA. 10.0\nB. 5.0\nC. 12.0\nD. 15.0\nE. 20.0\n" + SUFFIX
    assert second.question == "Which style?\nA. oil\nB. \nC. ink\n" + SUFFIX
    assert second.solution == "C" and second.meta["choices"] == ["A", "B", "C"]
    assert E.read_mmvu(str(tmp_path / "mmvu"), "reason")[1].solution == "B"  # clean: the empty one is dropped


# ----------------------------------------------------------------------------- the parser


class Guess:
    """Stands in for random.Random: says what it was asked to choose from."""
    def choice(self, choices):
        return "guess from " + "".join(choices)


@pytest.mark.parametrize("text,want", [
    ("<think>x</think> <answer>B</answer>", ("B", False)),
    ("<answer>  c. green </answer>", ("C", False)),  # lower case, returned upper case
    ("<answer>\nB\n</answer>", ("B", False)),  # \s* takes the newlines around the answer
    ("<answer>(c) green</answer>", ("C", False)),  # "(x)" anywhere in the answer
    ("<answer>It is (B), not (A)</answer>", ("A", False)),  # the first choice in choice order, not in the text
    ("<answer>Answer: (C)</answer>", ("A", False)),  # its first character "A" is a choice letter
    ("<answer>The answer is (D)</answer>", ("D", False)),  # "T" is not one; D is
    ("<answer></answer>", (None, False)),  # empty: no answer, counted wrong
    ("<answer>   </answer><answer>B</answer>", (None, False)),  # only the first <answer> is read
    ("<answer>B\nC</answer>", ("guess from ABCD", True)),  # the dot does not cross a newline: no match
    ("<think>the ball rolls</think> B", ("guess from ABCD", True)),  # no tags
    ("<answer>E</answer>", ("guess from ABCD", True)),  # not a choice
    ("<answer>blue</answer>", ("B", False)),  # its first character, in lower case, reads as B
    ("<answer>yes</answer>", ("guess from ABCD", True)),
])
def test_original_parser_edge_cases(text, want):
    assert E.parse_original(text, ["A", "B", "C", "D"], Guess()) == want


# ----------------------------------------------------------------------------- frames per MVBench task type


def test_mvbench_frames_per_task_type(tmp_path):
    """16 frames, as published. By hand: linspace(0, 11, 16) over a 12-frame file; segment midpoints
    int(start + seg/2 + round(seg*i)), seg = (end - start)/16, rounding halves to even as numpy does."""
    root = str(tmp_path / "MVBench")
    mvbench(root)
    samples = E.read_mvbench(root, "reason", "original")

    def ids(task):
        s = by(samples, task=task)
        return frame_ids(E.read_clip(s.video, 16, s.meta.get("bound"), s.meta.get("fps"), s.meta["frames_rule"]))

    # plain video, bounds (0.5 s, 2 s) ignored: the whole 12-frame clip, 11/15 apart, truncated
    whole = [0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11]
    for task in ("Action Sequence", "Action Prediction", "Object Interaction"):
        assert ids(task) == whole
    clean = by(E.read_mvbench(root, "reason"), task="Action Sequence")  # clean: frames 2..8 (0.5 s..2 s at 4 fps)
    assert frame_ids(E.read_clip(clean.video, 16, clean.meta["bound"])) == [2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8]
    # .avi (Fine-grained Pose), 12 frames: start 0, end 11, seg 0.6875; i = 8: round(5.5) = 6
    assert ids("Fine-grained Pose") == [0, 1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10]
    # .webm (Action Antonym; a gif here), 6 frames: seg 0.3125; i = 8: round(2.5) = 2, not 3
    assert ids("Action Antonym") == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    # frame folder (Episodic Reasoning), 9 files at 3 fps, 0.5 s..2 s: frames numbered round(1.5) = 2 to
    # min(round(6.0), 9) = 6, seg 0.25, round(0.5) = 0 and round(2.5) = 2; files 00002.jpg.. are indices 1..
    assert ids("Episodic Reasoning") == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5]
    # every other task: the whole file (6 frames here)
    assert ids("Moving Count") == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]


def test_videomme_mlvu_unique_and_mmvu_uniform_frames(tmp_path):
    videomme(str(tmp_path / "vm"))
    s = E.read_videomme(str(tmp_path / "vm"), "reason", "original")[0]  # 8 frames: linspace repeats, unique not
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 1, 2, 3, 4, 5, 6, 7]
    mlvu(str(tmp_path / "mlvu"))
    s = E.read_mlvu(str(tmp_path / "mlvu"), "reason", "original")[0]
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 1, 2, 3, 4, 5]
    mmvu(str(tmp_path / "mmvu"))
    s = E.read_mmvu(str(tmp_path / "mmvu"), "reason", "original")[0]
    assert frame_ids(E.read_clip(s.video, 16, rule=s.meta["frames_rule"])) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


# ----------------------------------------------------------------------------- end to end


def test_original_protocol_end_to_end_is_sampled_seeded_and_audited(ckpt, tmp_path, capsys):
    """A tiny random model answers MMVU twice (--samples 2): each run its own seed and file, every record
    with the prompt and frames; the same seed gives the same answers, another seed others."""
    root = str(tmp_path / "MMVU")
    mmvu(root)
    preds = str(tmp_path / "mmvu.jsonl")
    argv = ["--ckpt", ckpt, "--bench", "mmvu", "--root", root, "--protocol", "original", "--max-new-tokens", "12",
            "--predictions", preds, "--device", "cpu"]
    code, out, err = run(argv + ["--samples", "2", "--seed", "5"], capsys)
    assert code == 0, err
    runs = [[json.loads(line) for line in open(tmp_path / f"mmvu.seed{s}.jsonl")] for s in (5, 6)]
    asked = E.read_mmvu(root, "reason", "original")[:2]  # the third video is missing
    for rows in runs:
        assert [r["prompt"] for r in rows] == [D.build_prompt(s.question) for s in asked]
        assert all(r["frames"] == [0, 2, 4, 7] and r["choices"] == list("ABCDE") for r in rows)  # 4 of 8 frames
        assert all(r["pred"] in list("ABCDE") + [None] for r in rows)
    assert [r["output"] for r in runs[0]] != [r["output"] for r in runs[1]]
    summaries = [json.load(open(tmp_path / f"mmvu.seed{s}.summary.json")) for s in (5, 6)]
    assert [s["protocol"] for s in summaries] == ["original"] * 2 and summaries[1]["seed"] == 6
    both = json.load(open(tmp_path / "mmvu.summary.json"))
    assert both["seeds"] == [5, 6] and both["averages"] == [s["average"] for s in summaries]
    assert both["mean"] == pytest.approx(sum(both["averages"]) / 2)
    assert both["std"] == pytest.approx(abs(both["averages"][0] - both["averages"][1]) / 2 ** 0.5)
    assert "mean +- std over runs" in out
    # the same command again (a fresh file): the same answers and the same guesses
    code, _, err = run(argv[:-4] + ["--device", "cpu", "--predictions", str(tmp_path / "again.jsonl"), "--seed", "5"], capsys)
    assert code == 0, err
    again = [json.loads(line) for line in open(tmp_path / "again.seed5.jsonl")]
    assert [(r["output"], r["pred"]) for r in again] == [(r["output"], r["pred"]) for r in runs[0]]


def test_original_protocol_decoding_settings_and_guesses(ckpt, tmp_path, monkeypatch, capsys):
    """The generation settings reach generate; an unreadable answer is a seeded random guess (the same on a
    rerun, counted as unparsed); an empty one is wrong; default file names carry the protocol and seed."""
    root = str(tmp_path / "MLVU")
    mlvu(root)
    calls = []

    def generate(model, tok, questions, pixels, max_new_tokens=512, **kw):
        calls.append((max_new_tokens, {k: v for k, v in kw.items() if k not in ("generator", "decode")}, type(kw.get("generator"))))
        return ["<answer></answer>" if "plotQA 0" in q else "I think it is yes" for q in questions]

    monkeypatch.setattr(sample, "generate", generate)
    argv = ["--ckpt", ckpt, "--bench", "mlvu", "--root", root, "--protocol", "original"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert calls and all(c == (1024, dict(temperature=1.0, top_k=50, top_p=1.0), sample.torch.Generator) for c in calls)
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))]
    empty = next(r for r in rows if r["line"] == "1_plotQA:0")
    assert empty["pred"] is None and not empty["guessed"] and not empty["correct"]
    guesses = [r for r in rows if r is not empty]
    assert all(r["guessed"] and r["pred"] in ("A", "B") for r in guesses)
    summary = json.load(open(os.path.join(ckpt, "eval", "mlvu.original.seed0.summary.json")))
    assert summary["unparsed"] == 8 and summary["correct"] == sum(r["pred"] == "A" for r in guesses)
    os.remove(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))
    assert run(argv, capsys)[0] == 0
    rerun = [json.loads(line) for line in open(os.path.join(ckpt, "eval", "mlvu.original.seed0.jsonl"))]
    assert [r["pred"] for r in rerun] == [r["pred"] for r in rows]
    preds = {s: [json.loads(line)["pred"] for line in open(os.path.join(ckpt, "eval", f"mlvu.original.seed{s}.jsonl"))]
             for s in (1, 2, 3) if run(argv + ["--seed", str(s)], capsys)[0] == 0}
    assert len({tuple(p) for p in preds.values()} | {tuple(r["pred"] for r in rows)}) > 1  # other seeds, other guesses


def test_original_protocol_usage_errors(ckpt, tmp_path, capsys):
    root = str(tmp_path / "MLVU")
    mlvu(root)
    for extra in (["--protocol", "original", "--mode", "option"], ["--samples", "2"], ["--samples", "0"]):
        code, _, err = run(["--ckpt", ckpt, "--bench", "mlvu", "--root", root] + extra, capsys)
        assert code == 2 and err.count("\n") == 1, extra
    code, _, err = run(["--ckpt", ckpt, "--eval", "x.jsonl", "--protocol", "original"], capsys)
    assert code == 2 and "--protocol original is for --bench" in err
