"""Teacher-forced loss on the suffix: per-token NLL and perplexity.

Record: {image_id, source, task, loglik: float (sum of the suffix tokens'
log-probs, EOS included, from `Predictor.score`), n_tokens: int (suffix + EOS)}.
Keys: nll_per_token = -sum(loglik) / sum(n_tokens) (token-weighted, like
big_vision's perplexity evaluator 'avg'), perplexity = exp(nll_per_token),
nll_per_example, and the same per task ('task/<task>/...').
"""
import collections
import math

from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS


def _pooled(records):
  tokens = sum(int(r["n_tokens"]) for r in records)
  nll = -sum(float(r["loglik"]) for r in records)
  if not records:
    return {"n": 0.0}
  return {"n": float(len(records)), "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
          "nll_per_example": nll / len(records)}


def _metrics(records):
  out = _pooled(records)
  tasks = collections.defaultdict(list)
  for r in records:
    tasks[r.get("task") or "unknown"].append(r)
  if len(tasks) > 1:
    for task, recs in sorted(tasks.items()):
      out.update({f"task/{task}/{k}": v for k, v in _pooled(recs).items()})
  return out


@EVALUATORS.register("perplexity")
class Evaluator(common.Evaluator):
  name = "perplexity"

  def predict_batch(self, params, batch, gts):
    n = len(gts)
    loglik = self.predictor.score(params, batch["image"][:n], [g["prefix"] for g in gts],
                                  [g["suffix"] for g in gts])
    tok = self.predictor.tokenizer
    return [dict(common.base_record(g), loglik=float(ll), n_tokens=len(tok.encode(g["suffix"], eos=True)))
            for g, ll in zip(gts, loglik)]

  metric_fn = staticmethod(_metrics)
