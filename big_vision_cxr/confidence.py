"""Scores from token log-probabilities: box confidences and diagnosis probabilities.

Box score rules (`box_scores(..., rule=)`), from the log-probs of one object's
tokens as `loc_codec.parse_token_ids` locates them:
- 'mean_loc' (default): exp(mean of the 4 loc tokens' log-probs), the geometric
  mean probability of the box coordinates.
- 'first_loc': exp(log-prob of the first loc token), the probability that the
  model starts this object there (close to an objectness score).
- 'min_loc': exp(min of the 4 loc log-probs), the least certain coordinate.
- 'mean_object': exp(mean over the loc, seg and name tokens of the object).
- 'ones': every box scores 1.0 (PaliGemma-CXR's rule; AP then follows output order).

Diagnosis probability: the model scores each candidate answer's total
log-likelihood given the prompt (`Predictor.score`, EOS included); a softmax over
the candidates gives the probabilities and P(tb) = P('tuberculosis').
"""
import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.data import prompts

BOX_SCORE_RULES = ("mean_loc", "first_loc", "min_loc", "mean_object", "ones")


class ConfidenceError(errors.Error):
  """An unknown rule or log-probs that do not cover the parsed tokens."""


def box_scores(parse_result, token_logprobs, rule="mean_loc"):
  """ParseResult (from parse_token_ids) and per-token log-probs -> scores [n_objects]."""
  if rule not in BOX_SCORE_RULES:
    raise ConfidenceError(f"unknown box score rule {rule!r}; known: {BOX_SCORE_RULES}.")
  lp = np.asarray(token_logprobs, np.float64)
  scores = []
  for obj in parse_result.objects:
    if rule == "ones":
      scores.append(1.0)
      continue
    start, end = obj.token_span if rule == "mean_object" else obj.loc_span
    if end > len(lp):
      raise ConfidenceError(f"object tokens [{start}, {end}) run past the {len(lp)} log-probs; "
                            "parse the same token ids the log-probs belong to.")
    span = lp[start:end]
    value = {"mean_loc": span.mean, "mean_object": span.mean, "min_loc": span.min,
             "first_loc": lambda: span[0]}[rule]()
    scores.append(float(np.exp(value)))
  return np.asarray(scores, np.float64)


def label_probabilities(loglik):
  """[B, C] total log-likelihoods of C candidate answers -> softmax probabilities [B, C]."""
  loglik = np.asarray(loglik, np.float64)
  z = loglik - loglik.max(axis=-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=-1, keepdims=True)


DIAGNOSIS_CANDIDATES = tuple(prompts.DIAGNOSIS_ANSWERS.values())  # tb first
POSITIVE_ANSWER = prompts.DIAGNOSIS_ANSWERS["tb"]


def candidate_logliks(predictor, params, images, prefixes, candidates):
  """[B, C] log-likelihoods of each candidate answer via `Predictor.score`."""
  return np.stack([np.asarray(predictor.score(params, images, list(prefixes), [c] * len(prefixes)))
                   for c in candidates], axis=1)


def diagnosis_probabilities(predictor, params, images, prefixes, candidates=DIAGNOSIS_CANDIDATES):
  """-> dict(answer -> P [B]) from a softmax over the candidates' log-likelihoods."""
  probs = label_probabilities(candidate_logliks(predictor, params, images, prefixes, candidates))
  return {c: probs[:, i] for i, c in enumerate(candidates)}
