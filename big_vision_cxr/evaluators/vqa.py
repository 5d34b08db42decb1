"""VQA: close-ended accuracy, open-ended exact match and token F1.

Record: {image_id, source, question (the prefix), question_type: 'closed'|'open',
answer: str (ground truth), prediction: str}.

Answers are compared after `common.normalize_answer` (lower case, collapsed
whitespace, surrounding punctuation stripped). Token F1 is SQuAD's: the
harmonic mean of token precision and recall of the bag of answer words.
Keys: closed/accuracy, open/exact_match, open/token_f1, all/exact_match,
counts, and per question (`question/<question text>/exact_match`).
"""
import collections

import numpy as np

from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def token_f1(prediction, answer):
  p, a = common.normalize_answer(prediction).split(), common.normalize_answer(answer).split()
  if not p or not a:
    return float(p == a)
  common_tokens = sum((collections.Counter(p) & collections.Counter(a)).values())
  if not common_tokens:
    return 0.0
  precision, recall = common_tokens / len(p), common_tokens / len(a)
  return 2 * precision * recall / (precision + recall)


def _mean(values):
  return float(np.mean(values)) if len(values) else float("nan")


def sampler(records):
  """fn(indices) -> the metrics of records[indices]; answers compared once."""
  em = np.array([common.normalize_answer(r["prediction"]) == common.normalize_answer(r["answer"])
                 for r in records], bool)
  f1 = np.array([token_f1(r["prediction"], r["answer"]) for r in records], np.float64)
  kind = np.array([r["question_type"] for r in records], object)
  question = np.array([r["question"] for r in records], object)

  def metrics(i):
    i = np.asarray(i, int)
    closed, opened = kind[i] == "closed", kind[i] == "open"
    out = {
        "all/exact_match": _mean(em[i]), "n": float(len(i)),
        "closed/accuracy": _mean(em[i][closed]), "closed/n": float(closed.sum()),
        "open/exact_match": _mean(em[i][opened]), "open/token_f1": _mean(f1[i][opened]),
        "open/n": float(opened.sum()),
    }
    for q in sorted(set(question[i])):
      out[f"question/{q}/exact_match"] = _mean(em[i][question[i] == q])
    return out
  return metrics


def _metrics(records):
  return sampler(records)(np.arange(len(records)))


@EVALUATORS.register("vqa")
class Evaluator(common.Evaluator):
  name = "vqa"

  def predict_batch(self, params, batch, gts):
    outs = common.generate(self.predictor, params, batch, gts)
    return [dict(common.base_record(g), question=g["prefix"], question_type=g.get("question_type"),
                 answer=g["suffix"], prediction=o["text"]) for g, o in zip(gts, outs)]

  metric_fn = staticmethod(_metrics)
  sampler_fn = staticmethod(sampler)
