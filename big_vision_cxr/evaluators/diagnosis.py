"""TB diagnosis: accuracy, sensitivity, specificity, AUC, bootstrap CIs, WHO TPP point.

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
"""
import numpy as np
from scipy import stats

from big_vision_cxr import confidence
from big_vision_cxr.data import prompts
from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS

WHO_SENSITIVITY, WHO_SPECIFICITY = 0.9, 0.7


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


def _rate(mask):
  return float(mask.mean()) if len(mask) else float("nan")


def _metrics(records):
  answers = prompts.DIAGNOSIS_ANSWERS
  pred = [common.normalize_answer(r["prediction"]) for r in records]
  y = np.array([r["label"] == "tb" for r in records])
  correct = np.array([p == answers[r["label"]] for p, r in zip(pred, records)])
  pred_tb = np.array([p == answers["tb"] for p in pred])
  out = dict(
      n=float(len(records)), n_tb=float(y.sum()), n_not_tb=float((~y).sum()),
      accuracy=_rate(correct), binary_accuracy=_rate(pred_tb == y),
      sensitivity=_rate(pred_tb[y]), specificity=_rate(~pred_tb[~y]),
      invalid_rate=_rate(np.array([p not in answers.values() for p in pred])))
  boot = dict(accuracy=lambda i: _rate(correct[i]), sensitivity=lambda i: _rate(pred_tb[i][y[i]]),
              specificity=lambda i: _rate(~pred_tb[i][~y[i]]))
  if records and all(r.get("p_tb") is not None for r in records):
    p_tb = np.array([float(r["p_tb"]) for r in records])
    out["auc"] = auc(y, p_tb)
    boot["auc"] = lambda i: auc(y[i], p_tb[i])
    t, sens, spec = who_operating_point(y, p_tb)
    out.update(who_threshold=t, who_sensitivity=sens, who_specificity=spec,
               who_tpp_met=float(spec >= WHO_SPECIFICITY) if not np.isnan(spec) else float("nan"))
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
