"""Report generation: corpus BLEU-1..4, ROUGE-L, METEOR (exact match).

Record: {image_id, source, reference: str, prediction: str}.

All text is lower-cased (as PaliGemma-CXR scored) and tokenised with
sacrebleu's '13a' tokenizer. Scores are on a 0-100 scale.
- bleu1..bleu4: sacrebleu corpus BLEU with max n-gram order n (uniform weights,
  brevity penalty), tokenize='13a', lowercase=True, one reference per image.
- rougeL: mean over reports of the LCS-based F1 (beta = 1, like rouge-score).
- meteor: mean over reports of METEOR with exact word matches only (no stemming,
  synonyms or paraphrases, so it is at most the official METEOR): alignment
  matches each predicted word to the first unused equal reference word,
  Fmean = 10PR / (R + 9P), penalty = 0.5 (chunks / matches)^3.
"""
import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from big_vision_cxr.evaluators import common
from big_vision_cxr.registry import EVALUATORS

_TOKENIZE = Tokenizer13a()


def tokens(text):
  return _TOKENIZE(str(text).lower()).split()


def lcs_length(a, b):
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(prediction, reference):
  p, r = tokens(prediction), tokens(reference)
  lcs = lcs_length(p, r)
  if not lcs:
    return 0.0
  precision, recall = lcs / len(p), lcs / len(r)
  return 2 * precision * recall / (precision + recall)


def meteor_exact(prediction, reference):
  p, r = tokens(prediction), tokens(reference)
  used, matches = set(), []
  for i, word in enumerate(p):
    for j, ref_word in enumerate(r):
      if j not in used and word == ref_word:
        used.add(j)
        matches.append((i, j))
        break
  m = len(matches)
  if not m:
    return 0.0
  chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(matches, matches[1:]) if (i1, j1) != (i0 + 1, j0 + 1))
  precision, recall = m / len(p), m / len(r)
  fmean = 10 * precision * recall / (recall + 9 * precision)
  return fmean * (1 - 0.5 * (chunks / m) ** 3)


def sampler(records):
  """fn(indices) -> the metrics of records[indices]; each report scored once.

  Corpus BLEU of any resample is sacrebleu's own score of the summed per-report
  statistics (what `corpus_score` computes, and what sacrebleu's bootstrap uses).
  """
  preds = [r["prediction"] for r in records]
  refs = [r["reference"] for r in records]
  bleus = [BLEU(max_ngram_order=n, tokenize="13a", lowercase=True, effective_order=False)
           for n in range(1, 5)]
  # pylint: disable=protected-access
  stats = [np.array(b._extract_corpus_statistics(preds, [refs]), np.int64).reshape(len(records), -1)
           for b in bleus] if records else []
  rouge = np.array([rouge_l(p, r) for p, r in zip(preds, refs)], np.float64)
  meteor = np.array([meteor_exact(p, r) for p, r in zip(preds, refs)], np.float64)

  def metrics(i):
    i = np.asarray(i, int)
    out = {"n": float(len(i))}
    if not len(i):
      return out
    for n, (b, st) in enumerate(zip(bleus, stats), 1):
      out[f"bleu{n}"] = float(b._compute_score_from_stats(st[i].sum(0).tolist()).score)
    out["rougeL"] = 100 * float(np.mean(rouge[i]))
    out["meteor"] = 100 * float(np.mean(meteor[i]))
    return out
  return metrics


def _metrics(records):
  return sampler(records)(np.arange(len(records)))


@EVALUATORS.register("report")
class Evaluator(common.Evaluator):
  name = "report"

  def predict_batch(self, params, batch, gts):
    outs = common.generate(self.predictor, params, batch, gts)
    return [dict(common.base_record(g), reference=g.get("report") or g["suffix"], prediction=o["text"])
            for g, o in zip(gts, outs)]

  metric_fn = staticmethod(_metrics)
  sampler_fn = staticmethod(sampler)
