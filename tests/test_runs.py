"""runs.py: the picture of a run's metrics (its checkpoints are attacked in test_robust.py)."""

import math

import cv2

import runs


def test_curves_are_small_multiples(tmp_path):
    """One panel per metric, each with its own range: a flat metric and a missing one still get their panels."""
    records = [{"step": i + 1, "reward": math.sin(i / 3), "kl": 0.5, "loss": float("nan")} for i in range(40)]
    path = str(tmp_path / "c.png")
    runs.plot_curves(records, path, ["reward", "kl"])
    two = cv2.imread(path)
    runs.plot_curves(records, path, ["reward", "kl", "loss"])
    three = cv2.imread(path)
    assert two.shape[1] == three.shape[1] and three.shape[0] > two.shape[0] * 1.3
    inked = (two < 200).any(2)  # drawn pixels: lines, boxes, labels
    top, bottom = inked[: two.shape[0] // 2], inked[two.shape[0] // 2:]
    assert top.sum() > 500 and bottom.sum() > 500
