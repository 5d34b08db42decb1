"""The numbers behind the pictures (ROC, calibration/ECE, PR at IoU 0.5) by hand, and the PNGs."""
import json

import numpy as np
import pytest

from big_vision_cxr.evaluators import coco, detection, diagnosis, plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_roc_curve_by_hand():
  y, s = [1, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.2]
  fpr, tpr, thresholds = diagnosis.roc_curve(y, s)
  np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.2])
  np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 1])
  # The area under the drawn curve is the AUC the evaluator reports: 5 of 6 pairs ordered.
  assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6) == diagnosis.auc(y, s)
  fpr, tpr, _ = diagnosis.roc_curve([1, 0], [0.5, 0.5])  # a tie moves both at once
  np.testing.assert_array_equal(fpr, [0, 1]) and np.testing.assert_array_equal(tpr, [0, 1])


def test_calibration_bins_and_ece_by_hand():
  y, p = [0, 0, 1, 1, 1, 0], [0.05, 0.15, 0.15, 0.95, 1.0, 0.55]
  count, mean_p, frac = diagnosis.calibration_bins(y, p)
  np.testing.assert_array_equal(count, [1, 2, 0, 0, 0, 1, 0, 0, 0, 2])  # P(tb) = 1 is in the last bin
  np.testing.assert_allclose(mean_p[[0, 1, 5, 9]], [0.05, 0.15, 0.55, 0.975])
  np.testing.assert_allclose(frac[[0, 1, 5, 9]], [0, 0.5, 0, 1])
  # ECE = (1 * .05 + 2 * .35 + 1 * .55 + 2 * .025) / 6
  assert diagnosis.expected_calibration_error(y, p) == pytest.approx(1.35 / 6)
  assert diagnosis.expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == 0.0  # calibrated
  recs = [dict(label="tb" if t else "normal", prediction="normal", p_tb=q) for t, q in zip(y, p)]
  assert diagnosis.Evaluator.compute_metrics(recs)["ece"] == pytest.approx(1.35 / 6)


def _det_records():
  """Two images, one lesion each; scores .9 (hit a), .8 (a miss on b), .7 (hit b)."""
  a, b = [0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]
  obj = lambda box, score: dict(bbox=box, label="active tb", scores=dict(mean_loc=score))
  return [dict(image_id="a", source="s", height=100, width=100, gt=dict(bbox=[a], label=["active tb"]),
               prediction="", objects=[obj(a, 0.9)], n_invalid=0),
          dict(image_id="b", source="s", height=100, width=100, gt=dict(bbox=[b], label=["active tb"]),
               prediction="", objects=[obj([0.0, 0.6, 0.1, 0.7], 0.8), obj(b, 0.7)], n_invalid=0)]


def test_pr_curve_at_iou_50_by_hand():
  # Ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; interpolated (the
  # best precision at any higher recall): 1 up to recall 0.5, 2/3 above it.
  curves = detection.pr_curves(_det_records())
  want = np.where(coco.RECALL <= 0.5, 1.0, 2 / 3)
  for name in ("agnostic", "active tb"):
    np.testing.assert_allclose(curves["mean_loc"][name], want)
  # All-ones scores rank in output order: TP (a), FP, TP: the same curve here.
  np.testing.assert_allclose(curves["ones"]["agnostic"], want)
  # AP50 is the curve's mean over the 101 recall points.
  m = detection.Evaluator.compute_metrics(_det_records())
  assert m["mean_loc/AP50"] == pytest.approx(want.mean()) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_draw_writes_every_picture(tmp_path):
  y = np.arange(40) % 2
  diag = [dict(label="tb" if t else "normal", prediction="normal", p_tb=float(0.3 + 0.4 * t - 0.01 * k % 3))
          for k, t in enumerate(y)]
  evaluators = {"diag": (diagnosis.Evaluator(None, [], eval_set="nih+tbx11k"), 0),
                "det": (detection.Evaluator(None, [], eval_set="tbx11k/val"), 0)}
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(dict(step=s, loss=3.0 / s, **{"loss/diagnosis": 2.0 / s}))
                             + "\n" for s in range(1, 6)) + "not json\n")
  paths = plots.draw(tmp_path / "out", evaluators, {"diag": diag, "det": _det_records()}, metrics)
  assert sorted(p.name for p in paths) == sorted([
      "roc_nih+tbx11k_diagnosis.png", "calibration_nih+tbx11k_diagnosis.png",
      "pr_tbx11k_val_detection.png", "training_loss.png"])
  for p in paths:
    data = p.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
