"""kdl's detection metrics on detections made by hand, against COCO's arithmetic worked out on
paper: AP is the precision interpolated at 101 recall points (0, 0.01, ..., 1), a detection
matches an unmatched ground-truth box of its class when their IoU reaches the threshold, mAP
averages over the IoU thresholds 0.5, 0.55, ..., 0.95 and over the classes with boxes."""

from __future__ import annotations

import pytest
import torch

from karpathy_runner.tasks.detect import scores

NAMES = ["background", "square", "disc"]


def _image(found, truth):
    """(detections, targets) of one image: found as (box, class, score), truth as (box, class)."""
    return ({"boxes": torch.tensor([b for b, _, _ in found], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor([c for _, c, _ in found], dtype=torch.int64),
             "scores": torch.tensor([s for _, _, s in found], dtype=torch.float32)},
            {"boxes": torch.tensor([b for b, _ in truth], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor([c for _, c in truth], dtype=torch.int64)})


def test_map_is_coco_arithmetic_on_detections_made_by_hand():
    """Squares: one found exactly (score 0.9), one found at IoU 0.64 (a box of 8x8 in the corner
    of its 10x10, score 0.8; read as x, y, width, height they would overlap by 0.87). Discs: one
    box, never found, and a false disc on an image of none.
      IoU 0.5 to 0.6 (3 thresholds): both squares match, precision 1 at recall 1: AP 1.
      IoU 0.65 to 0.95 (7): the 0.9 matches, the 0.8 does not: precision 1 up to recall 0.5,
        0 after: 51 of the 101 recall points, AP 51/101.
      squares: mAP (3 + 7 x 51/101) / 10 = 0.6535, recall (3 x 1 + 7 x 0.5) / 10 = 0.65.
      discs: AP 0 and recall 0 at every threshold.
    Over the two classes: mAP 0.3267, mAP@0.5 0.5, mAP@0.75 51/101/2 = 0.2525, mAR@100 0.325."""
    scored = [
        _image([([10, 10, 20, 20], 1, 0.9)], [([10, 10, 20, 20], 1), ([30, 30, 50, 50], 2)]),
        _image([([20, 20, 28, 28], 1, 0.8)], [([20, 20, 30, 30], 1)]),
        _image([([5, 5, 15, 15], 2, 0.7)], []),
    ]
    squares = (3 + 7 * 51 / 101) / 10
    metrics = scores(scored, NAMES, detailed=True)
    assert metrics["map"] == pytest.approx(squares / 2, abs=1e-4)
    assert metrics["map_50"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["map_75"] == pytest.approx(51 / 101 / 2, abs=1e-4)
    assert metrics["mar_100"] == pytest.approx(0.65 / 2, abs=1e-4)
    assert metrics["per_class_ap"] == pytest.approx({"square": squares, "disc": 0.0}, abs=1e-4)


def test_a_higher_scored_false_detection_lowers_precision_at_every_recall():
    """A false square scored above both true ones: the precision is 1/2 at recall 1/2 and 2/3 at
    recall 1 at IoU 0.5, interpolated to 2/3 everywhere: AP 2/3. A disc found where the split
    has none has no AP (None), and leaves the mean alone."""
    scored = [
        _image([([10, 10, 20, 20], 1, 0.9), ([40, 40, 60, 60], 1, 0.95)], [([10, 10, 20, 20], 1)]),
        _image([([0, 0, 10, 10], 1, 0.8), ([30, 30, 40, 40], 2, 0.6)], [([0, 0, 10, 10], 1)]),
    ]
    metrics = scores(scored, NAMES, detailed=True)
    assert metrics["map_50"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["per_class_ap"] == pytest.approx({"square": 2 / 3, "disc": None}, abs=1e-4)


def test_a_split_without_boxes_scores_zero_not_minus_one():
    metrics = scores([_image([([0, 0, 4, 4], 1, 0.5)], [])], NAMES)
    assert metrics == {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "mar_100": 0.0}
