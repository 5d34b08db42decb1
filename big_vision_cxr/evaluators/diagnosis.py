"""TB diagnosis: accuracy, sensitivity, specificity, AUC, calibration, bootstrap CIs, WHO TPP point.

Record: {image_id, source, label: 'tb'|'normal'|'sick_non_tb', prediction: str,
p_tb: float (optional; softmax over the candidate answers' log-likelihoods)}.

- accuracy: the normalised generated answer equals the label's answer string
  (3 classes when the data has 'abnormal, not tuberculosis').
- sensitivity / specificity / binary_accuracy: TB vs not TB from the text.
- auc: from p_tb (rank statistic, ties count half), when every record has it.
- *_ci95: percentile bootstrap, 1000 resamples stratified by TB vs not TB, seed 0.
- WHO TPP for TB triage (sensitivity >= 0.9 with specificity >= 0.7): the
  largest threshold t on p_tb with sensitivity(p_tb >= t) >= 0.9, the
  specificity there, and who_tpp_met = 1.0 if it is >= 0.7.
- ece: expected calibration error of p_tb, 10 equal-width bins (`calibration_bins`).
`sampler(records)` gives the metrics of any resample (no CIs) from answers parsed
once; `roc_curve` and `calibration_bins` are what the plots draw.
"""
import numpy as np
from scipy import stats

from big_vision_cxr import confidence
from big_vision_cxr.data import prompts
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS

WHO_SENSITIVITY, WHO_SPECIFICITY = 0.9, 0.7
CALIBRATION_BINS = 10


def auc(y, scores):
  """ROC AUC = P(score of a positive > score of a negative), ties half."""
  y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if not n_pos or not n_neg:
    return float("nan")
  ranks = stats.rankdata(scores)  # average ranks: Mann-Whitney U with ties
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def who_operating_point(y, scores):
  """(threshold, sensitivity, specificity) at the largest threshold with sens >= 0.9."""
  y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
  if not y.any() or y.all():
    return float("nan"), float("nan"), float("nan")
  for t in np.unique(scores)[::-1]:
    pred = scores >= t
    sens = pred[y].mean()
    if sens >= WHO_SENSITIVITY:
      return float(t), float(sens), float((~pred[~y]).mean())
  raise AssertionError("unreachable: the lowest threshold gives sensitivity 1")


def roc_curve(y, scores):
  """(fpr, tpr, thresholds): one point per distinct score t (predict TB when p_tb >= t),
  highest first, after the point (0, 0) at t = inf."""
  y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
  thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
  pred = scores[None, :] >= thresholds[:, None]  # [thresholds, records]
  tpr = pred[:, y].mean(1) if y.any() else np.full(len(thresholds), np.nan)
  fpr = pred[:, ~y].mean(1) if (~y).any() else np.full(len(thresholds), np.nan)
  return fpr, tpr, thresholds


def calibration_bins(y, p_tb, n_bins=CALIBRATION_BINS):
  """(count, mean P(tb), TB fraction) per bin of P(tb): [0, 1/B), ..., [(B-1)/B, 1]."""
  y, p_tb = np.asarray(y, np.float64), np.asarray(p_tb, np.float64)
  b = np.minimum((p_tb * n_bins).astype(int), n_bins - 1)
  count = np.bincount(b, minlength=n_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (count, np.bincount(b, p_tb, n_bins) / count, np.bincount(b, y, n_bins) / count)


def expected_calibration_error(y, p_tb, n_bins=CALIBRATION_BINS):
  """ECE = sum over bins of (share of records) * |TB fraction - mean P(tb)|."""
  count, mean_p, frac = calibration_bins(y, p_tb, n_bins)
  if not count.sum():
    return float("nan")
  full = count > 0
  return float(np.sum(count[full] / count.sum() * np.abs(frac[full] - mean_p[full])))


def _rate(mask):
  return float(mask.mean()) if len(mask) else float("nan")


def _arrays(records):
  """Per record: TB label, answer correct, answered TB, answer invalid; P(tb) (None unless all have it)."""
  answers = prompts.DIAGNOSIS_ANSWERS
  pred = [common.normalize_answer(r["prediction"]) for r in records]
  y = np.array([r["label"] == "tb" for r in records], bool)
  correct = np.array([p == answers[r["label"]] for p, r in zip(pred, records)], bool)
  pred_tb = np.array([p == answers["tb"] for p in pred], bool)
  invalid = np.array([p not in answers.values() for p in pred], bool)
  p_tb = None
  if records and all(r.get("p_tb") is not None for r in records):
    p_tb = np.array([float(r["p_tb"]) for r in records])
  return y, correct, pred_tb, invalid, p_tb


def _sampler(y, correct, pred_tb, invalid, p_tb):
  def metrics(i):
    yi, ti = y[i], pred_tb[i]
    out = dict(
        n=float(len(i)), n_tb=float(yi.sum()), n_not_tb=float((~yi).sum()),
        accuracy=_rate(correct[i]), binary_accuracy=_rate(ti == yi),
        sensitivity=_rate(ti[yi]), specificity=_rate(~ti[~yi]), invalid_rate=_rate(invalid[i]))
    if p_tb is not None:
      out["auc"] = auc(yi, p_tb[i])
      t, sens, spec = who_operating_point(yi, p_tb[i])
      out.update(who_threshold=t, who_sensitivity=sens, who_specificity=spec,
                 who_tpp_met=float(spec >= WHO_SPECIFICITY) if not np.isnan(spec) else float("nan"),
                 ece=expected_calibration_error(yi, p_tb[i]))
    return out
  return metrics


def sampler(records):
  """fn(indices) -> the metrics of records[indices] without the bootstrap CIs (answers parsed once)."""
  return _sampler(*_arrays(records))


def _metrics(records):
  arrays = _arrays(records)
  y, correct, pred_tb, _, p_tb = arrays
  out = _sampler(*arrays)(np.arange(len(records)))
  boot = dict(accuracy=lambda i: _rate(correct[i]), sensitivity=lambda i: _rate(pred_tb[i][y[i]]),
              specificity=lambda i: _rate(~pred_tb[i][~y[i]]))
  if p_tb is not None:
    boot["auc"] = lambda i: auc(y[i], p_tb[i])
  for name, fn in boot.items():
    lo, hi = common.bootstrap_ci(fn, len(records), strata=y.astype(int)) if records else (np.nan, np.nan)
    out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = lo, hi
  return out


@EVALUATORS.register("diagnosis")
class Evaluator(common.Evaluator):
  """Generates the answer and, with `score_candidates`, P(tb) from the candidates' scores."""
  name = "diagnosis"

  def __init__(self, predictor, data, *, score_candidates=True, **kw):
    super().__init__(predictor, data, **kw)
    self.score_candidates = score_candidates

  def predict_batch(self, params, batch, gts):
    outs = common.generate(self.predictor, params, batch, gts)
    records = [dict(common.base_record(g), label=g["label"], prediction=o["text"]) for g, o in zip(gts, outs)]
    if self.score_candidates:
      probs = confidence.diagnosis_probabilities(
          self.predictor, params, np.asarray(batch["image"])[:len(gts)], [g["prefix"] for g in gts])
      for i, r in enumerate(records):
        r["p_tb"] = float(probs[confidence.POSITIVE_ANSWER][i])
    return records

  metric_fn = staticmethod(_metrics)
  sampler_fn = staticmethod(sampler)
