"""Jitted KV-cache generation (greedy, sampling, beam search), scoring and `Predictor`.

Prompt layout (training's, `pp.ops_text.layout`): the model sees
  [image tokens] [BOS] prefix ["\\n"]  -> suffix ... [EOS]
where the prefix block (image, BOS, prompt, "\\n") is one bidirectional block
(mask_ar 0) and each generated token is causal. Prompts are left-aligned in a
prompt buffer padded at its end; pad slots are masked out of attention and
positions are cumsum(input_mask) - 1, so padding changes nothing (the model sees
contiguous positions 0..n-1 for the real prefix, then n, n+1, ... for the suffix).

The prefill runs the whole prefix once and fills the cache; each later step feeds
one token. Only the last prefix position's logits are computed (the full-vocab
head on every prefix position would dominate memory with a 257k vocabulary).

Each decode step should only read the weights and the KV cache. The LLM therefore
runs in gemma's dot layout (`prepare`: the weights D-first and the tied head as a
[D, V] table, transposed once, outside the loop), so XLA copies no weight inside
the step. `Predictor` prepares once per params; the jitted functions prepare once
per call when given the stored params. `weights_dtype=jnp.bfloat16` decodes with
bfloat16 LLM weights and activations (float32 logits and softmax statistics), about
half the memory traffic of a step on an accelerator (XLA:CPU computes a bfloat16
matrix-vector product in float32, so on a CPU float32 decodes faster); the default
(None) is the model's own dtype.

Log-probabilities: every returned `token_logprobs[i]` is log_softmax of the
model's *untempered, unmasked* logits for the chosen token, i.e. the model's own
probability of that token, whatever sampler picked it. Tokens after EOS are pad
(0) with log-prob 0.

Beam search keeps `beam_size` hypotheses ranked by the total log-prob of their
tokens (EOS included, no length normalisation, so shorter finished hypotheses are
preferred at equal per-token quality). A finished hypothesis keeps its score; the
search stops for an example once its best hypothesis is finished (no alive one
can overtake it, log-probs being <= 0) or at `max_decode_len`, where unfinished
hypotheses compete with the score of their truncated tokens.
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.models import gemma
from big_vision_cxr.models.paligemma import make_attn_mask
from big_vision_cxr.pp import ops_text

SAMPLERS = ("greedy", "temperature", "top_k", "top_p")


class DecodeError(errors.Error):
  """Bad decoding arguments (sampler settings, prompt too long, shapes)."""


def check_sampler(sampler, temperature=1.0, top_k=None, top_p=None, beam_size=1):
  if sampler not in SAMPLERS:
    raise DecodeError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  if not temperature > 0:
    raise DecodeError(f"temperature must be > 0, got {temperature!r}.")
  if sampler == "top_k" and not (isinstance(top_k, int) and top_k >= 1):
    raise DecodeError(f"sampler 'top_k' needs an int top_k >= 1, got {top_k!r}.")
  if sampler == "top_p" and not (top_p is not None and 0 < top_p <= 1):
    raise DecodeError(f"sampler 'top_p' needs 0 < top_p <= 1, got {top_p!r}.")
  if not (isinstance(beam_size, int) and beam_size >= 1):
    raise DecodeError(f"beam_size must be an int >= 1, got {beam_size!r}.")
  if beam_size > 1 and sampler != "greedy":
    raise DecodeError(f"beam search (beam_size={beam_size}) is deterministic: use sampler='greedy'.")


def _first_max(x):  # [B, N] -> [B] int32: the first index of each row's max.
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.min(jnp.where(x == jnp.max(x, axis=1, keepdims=True), iota, x.shape[1]), axis=1)


def argmax(logits, block=128):
  """jnp.argmax(logits [B, V], -1) as int32 (NaN counts as +inf), in two passes over
  blocks of `block` logits: XLA:CPU's one-pass argmax is a scalar loop (1.3 ms a row at
  a 257k vocabulary)."""
  b, v = logits.shape
  blocks = jnp.where(jnp.isnan(logits), jnp.inf, logits)
  blocks = jnp.pad(blocks, ((0, 0), (0, -v % block)), constant_values=-jnp.inf)
  blocks = blocks.reshape(b, -1, block)  # [B, V/block, block]
  first = _first_max(jnp.max(blocks, axis=2))  # [B] the block of the first max.
  within = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]  # [B, block]
  return first * block + _first_max(within)


def pick_tokens(logits, rng, sampler="greedy", temperature=1.0, top_k=None, top_p=None):
  """Chooses one token per row of logits [B, V] (float32) -> [B] int32."""
  if sampler == "greedy":
    return argmax(logits)
  logits = logits / temperature
  if sampler == "top_k":  # Ties with the k-th value are kept too.
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  elif sampler == "top_p":  # Smallest set of most likely tokens with total prob >= top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # The first token is always kept.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _token_logprob(logits, tokens):  # [B, V], [B] -> [B]
  chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


@flax.struct.dataclass
class DecodeParams:
  """Params laid out for decoding by `prepare`: `img` as stored, `llm` in gemma's dot
  layout (cast to `weights_dtype`)."""
  params: Any
  weights_dtype: Any = flax.struct.field(pytree_node=False, default=None)


def prepare(params, weights_dtype=None):
  """Stored params -> DecodeParams (one transposed copy of the LLM weights; jittable)."""
  if isinstance(params, DecodeParams):
    return params
  return DecodeParams(dict(params, llm=gemma.to_dot_layout(params["llm"], weights_dtype)),
                      weights_dtype)


def decode_model(model, weights_dtype=None):
  """`model` with its LLM in the dot layout, computing in `weights_dtype` (None: as is)."""
  llm = dict(model.llm, dot_layout=True)
  if weights_dtype is not None:
    llm["dtype"] = weights_dtype
  return type(model)(img=model.img, llm=llm)


def head_logits(model, params, pre_logits):
  """pre_logits [B, D] -> logits [B, V] float32 (the tied head, softcap included)."""
  return model.apply({"params": params}, pre_logits[:, None], method="logits")[:, 0]


def prefill(model, params, images, text, input_mask, max_decode_len, cache_dtype):
  """Runs image + prompt through the LLM once, filling a fresh cache.

  text, input_mask [B, P]: BOS + prompt + "\\n", left-aligned, pads masked.
  Returns (logits of the last prompt token [B, V] f32, cache, valid [B, S] bool
  cache slots, next position [B], number of prefix slots N+P).
  """
  x, mask, mask_ar = model.apply({"params": params}, images, text, input_mask=input_mask,
                                 mask_ar=jnp.zeros_like(text), method="embed_image_and_text")
  b, prefix_len = mask.shape
  cache_size = prefix_len + max_decode_len
  attn_mask = jnp.pad(make_attn_mask(mask, mask_ar), ((0, 0), (0, 0), (0, max_decode_len)))
  positions = jnp.cumsum(mask, axis=1) - 1  # [B, N+P]
  cache = model.init_cache(b, cache_size, cache_dtype)
  (_, out), variables = model.apply(
      {"params": params, "cache": cache}, x, positions, attn_mask, decode=True,
      method="llm_forward", mutable=["cache"])
  n_valid = jnp.sum(mask, axis=1)  # [B]; valid slots are [0, n_valid).
  last = out["pre_logits"][jnp.arange(b), n_valid - 1]  # [B, D]
  logits = head_logits(model, params, last)
  valid = jnp.pad(mask, ((0, 0), (0, max_decode_len)))  # [B, S]
  return logits, variables["cache"], valid, n_valid, prefix_len


def extend(model, params, cache, tokens, positions, valid):
  """Feeds one token per example (tokens, positions [B]); valid [B, S] must
  already include its slot. Returns (logits [B, V] f32, cache)."""
  (_, out), variables = model.apply(
      {"params": params, "cache": cache}, tokens[:, None], positions[:, None], valid[:, None, :],
      decode=True, method="llm_forward", mutable=["cache"])
  return head_logits(model, params, out["pre_logits"][:, 0]), variables["cache"]


def _for_decoding(model, params, weights_dtype):
  """(decode_model, its params): stored params are prepared here, once per call."""
  params = prepare(params, weights_dtype)
  if params.weights_dtype != weights_dtype:
    raise DecodeError(f"params prepared for weights_dtype={params.weights_dtype}, "
                      f"the function decodes with {weights_dtype}.")
  return decode_model(model, weights_dtype), params.params


def _sample(model, params, images, text, input_mask, rng, *, max_decode_len, eos_id, pick,
            cache_dtype, weights_dtype):
  model, params = _for_decoding(model, params, weights_dtype)
  logits, cache, valid, n_valid, prefix_len = prefill(
      model, params, images, text, input_mask, max_decode_len, cache_dtype)
  b = text.shape[0]
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def record(state, logits):
    t, tokens, logps, done = state["t"], state["tokens"], state["logps"], state["done"]
    tok = pick(logits, jax.random.fold_in(rng, t))
    logp = jnp.where(done, 0.0, _token_logprob(logits, tok))
    tok = jnp.where(done, 0, tok)
    return dict(state, t=t + 1, tokens=tokens.at[:, t].set(tok), logps=logps.at[:, t].set(logp),
                done=done | (tok == eos_id))

  def body(state):
    t = state["t"]  # Feed token t-1 into slot prefix_len + t - 1 at position n_valid + t - 1.
    valid = state["valid"].at[:, prefix_len + t - 1].set(True)
    logits, cache = extend(model, params, state["cache"], state["tokens"][:, t - 1],
                           n_valid + t - 1, valid)
    return record(dict(state, cache=cache, valid=valid), logits)

  def cond(state):
    return (state["t"] < max_decode_len) & ~jnp.all(state["done"])

  state = dict(t=jnp.int32(0), tokens=jnp.zeros((b, max_decode_len), jnp.int32),
               logps=jnp.zeros((b, max_decode_len), jnp.float32), done=jnp.zeros(b, bool),
               cache=cache, valid=valid)
  state = jax.lax.while_loop(cond, body, record(state, logits))
  return state["tokens"], state["logps"]


def _map_kv(fn, cache):
  """fn(array, batch_axis) on each key/value cache ([..., B, S, K, H]); indices unchanged."""
  return jax.tree.map(lambda c: fn(c, c.ndim - 4) if c.ndim >= 4 else c, cache)


def _beam(model, params, images, text, input_mask, rng, *, max_decode_len, eos_id, beam_size,
          cache_dtype, weights_dtype):
  del rng  # Deterministic.
  k = beam_size
  model, params = _for_decoding(model, params, weights_dtype)
  logits, cache, valid, n_valid, prefix_len = prefill(
      model, params, images, text, input_mask, max_decode_len, cache_dtype)
  b, vocab = logits.shape
  logp0 = jax.nn.log_softmax(logits)  # [B, V]
  scores, tok = jax.lax.top_k(logp0, k)  # [B, k], sorted best first.
  tokens = jnp.zeros((b, k, max_decode_len), jnp.int32).at[:, :, 0].set(tok)
  logps = jnp.zeros((b, k, max_decode_len), jnp.float32).at[:, :, 0].set(scores)
  repeat = lambda x: jnp.repeat(x, k, axis=0)  # [B, ...] -> [B*k, ...]
  cache = _map_kv(lambda c, axis: jnp.repeat(c, k, axis=axis), cache)
  valid, n_valid = repeat(valid), repeat(n_valid)

  def body(state):
    t = state["t"]
    valid = state["valid"].at[:, prefix_len + t - 1].set(True)
    logits, cache = extend(model, params, state["cache"], state["tokens"][:, :, t - 1].reshape(-1),
                           n_valid + t - 1, valid)
    lp = jax.nn.log_softmax(logits).reshape(b, k, vocab)
    done = state["done"]  # [B, k]; a finished beam may only add pad (0) at no cost.
    only_pad = jnp.where(jnp.arange(vocab) == 0, 0.0, -jnp.inf)
    cand = state["scores"][:, :, None] + jnp.where(done[:, :, None], only_pad, lp)
    scores, flat = jax.lax.top_k(cand.reshape(b, k * vocab), k)  # [B, k]
    origin, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, origin.reshape(origin.shape + (1,) * (x.ndim - 2)), 1)
    was_done = gather(done)
    tok_logp = jnp.where(was_done, 0.0, jnp.take_along_axis(gather(lp), tok[:, :, None], 2)[:, :, 0])
    rows = (origin + jnp.arange(b)[:, None] * k).reshape(-1)  # [B*k] rows of the flat batch.
    cache = _map_kv(lambda c, axis: jnp.take(c, rows, axis=axis), cache)
    return dict(t=t + 1, scores=scores, cache=cache, valid=valid,
                tokens=gather(state["tokens"]).at[:, :, t].set(tok),
                logps=gather(state["logps"]).at[:, :, t].set(tok_logp),
                done=was_done | (tok == eos_id))

  def cond(state):  # Beams are sorted: once the best one is finished nothing can beat it.
    return (state["t"] < max_decode_len) & ~jnp.all(state["done"][:, 0])

  state = dict(t=jnp.int32(1), scores=scores, cache=cache, valid=valid, tokens=tokens,
               logps=logps, done=tok == eos_id)
  state = jax.lax.while_loop(cond, body, state)
  return state["tokens"][:, 0], state["logps"][:, 0]


def make_generate_fn(model, *, max_decode_len, eos_id, sampler="greedy", temperature=1.0,
                     top_k=None, top_p=None, beam_size=1, cache_dtype=jnp.float32,
                     weights_dtype=None):
  """Jitted fn(params, images, text, input_mask, rng) -> (tokens, logprobs) [B, max_decode_len].

  params: the stored params, or `prepare(params, weights_dtype)` (reused across calls).
  text / input_mask [B, P]: BOS + prompt + "\\n" left-aligned, then pads (mask 0).
  Stops when every example has produced `eos_id` (pass -1 to never stop early).
  """
  check_sampler(sampler, temperature, top_k, top_p, beam_size)
  if not (isinstance(max_decode_len, int) and max_decode_len >= 1):
    raise DecodeError(f"max_decode_len must be an int >= 1, got {max_decode_len!r}.")
  if beam_size > 1:
    fn = functools.partial(_beam, model, beam_size=beam_size)
  else:
    pick = functools.partial(pick_tokens, sampler=sampler, temperature=temperature, top_k=top_k,
                             top_p=top_p)
    fn = functools.partial(_sample, model, pick=pick)
  return jax.jit(functools.partial(fn, max_decode_len=max_decode_len, eos_id=eos_id,
                                   cache_dtype=cache_dtype, weights_dtype=weights_dtype))


def make_score_fn(model):
  """Jitted fn(params, images, text, mask_ar, mask_loss) -> (total [B], per-token [B, L-1]).

  Training layout: text = BOS prefix "\\n" suffix EOS, pads at the end; the model
  sees text[:, :-1] and the log-prob of text[:, 1:] is summed where mask_loss[:, 1:].
  """
  def score(params, images, text, mask_ar, mask_loss):
    logits, _ = model.apply({"params": params}, images, text[:, :-1], mask_ar[:, :-1])
    targets = text[:, 1:]
    tok_logp = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(logits, axis=-1))  # [B, L-1]
    tok_logp = tok_logp * mask_loss[:, 1:]
    return jnp.sum(tok_logp, axis=1), tok_logp
  return jax.jit(score)


def _bucket(n, step):
  return max(step, -(-n // step) * step)


def _batch_bucket(n):
  return 1 << (n - 1).bit_length()


class Predictor:
  """Text in, text out: what evaluators, predict.py and the trainer use.

  Prompts are tokenized as training does: BOS + prefix, then the "\\n" separator.
  Batches are padded to a power of two (with copies of the last example, whose
  results are dropped) and prompt lengths to a multiple of `length_bucket`, so
  repeated calls reuse the compiled function.
  """

  def __init__(self, model, tokenizer, *, max_decode_len, sampler="greedy", beam_size=1,
               temperature=1.0, top_k=None, top_p=None, max_prompt_len=128, length_bucket=16,
               cache_dtype=jnp.float32, weights_dtype=None):
    self.model, self.tokenizer = model, tokenizer
    self.max_decode_len, self.max_prompt_len = max_decode_len, max_prompt_len
    self.length_bucket = length_bucket
    self._generate = make_generate_fn(
        model, max_decode_len=max_decode_len, eos_id=tokenizer.eos_id, sampler=sampler,
        temperature=temperature, top_k=top_k, top_p=top_p, beam_size=beam_size,
        cache_dtype=cache_dtype, weights_dtype=weights_dtype)
    self._prepare = jax.jit(functools.partial(prepare, weights_dtype=weights_dtype))
    self._prepared = (None, None)  # (params, prepare(params)): params held, so `is` is safe.
    self._score = make_score_fn(model)

  def _prefix_ids(self, prefix):
    return self.tokenizer.encode(prefix, bos=True)

  def prompt_tokens(self, prefix):
    """The prompt as training lays it out: BOS + prefix + the separator."""
    ids = self._prefix_ids(prefix)
    return ops_text.layout(ids, self.tokenizer.sep_id, (), len(ids) + 1)[0].tolist()

  def _check_batch(self, images, *texts):
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise DecodeError(f"images must be [B, H, W, 3] in [-1, 1], got shape {images.shape}.")
    for name, items in texts:
      if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise DecodeError(f"{name} must be a list of str.")
      if len(items) != len(images):
        raise DecodeError(f"{len(items)} {name} for {len(images)} images.")
    if not len(images):
      raise DecodeError("empty batch: no images.")
    return images

  def _pad_batch(self, arrays, n):
    size = _batch_bucket(n)
    return [np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]) for a in arrays]

  def generate(self, params, images, prefixes, rng=None):
    """-> list of dict(text, tokens, token_logprobs); tokens end with EOS if it was produced."""
    images = self._check_batch(images, ("prefixes", prefixes))
    prompts = [self._prefix_ids(p) for p in prefixes]
    for i, ids in enumerate(prompts):
      if len(ids) + 1 > self.max_prompt_len:
        raise DecodeError(f"prefix {i} is {len(ids) + 1} tokens with BOS and separator, more than "
                          f"max_prompt_len={self.max_prompt_len}: {prefixes[i][:60]!r}.")
    length = min(_bucket(max(map(len, prompts)) + 1, self.length_bucket), self.max_prompt_len)
    text = np.stack([ops_text.layout(ids, self.tokenizer.sep_id, (), length)[0] for ids in prompts])
    n = len(prompts)
    images, text = self._pad_batch([images, text], n)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if self._prepared[0] is not params:
      self._prepared = (params, self._prepare(params))
    tokens, logps = jax.device_get(self._generate(self._prepared[1], images, text, text != 0, rng))
    results = []
    for toks, lps in zip(tokens[:n], logps[:n]):
      toks = toks.tolist()
      end = toks.index(self.tokenizer.eos_id) + 1 if self.tokenizer.eos_id in toks else len(toks)
      results.append(dict(text=self.tokenizer.decode(toks[:end]), tokens=toks[:end],
                          token_logprobs=lps[:end].tolist()))
    return results

  def score(self, params, images, prefixes, suffixes):
    """Teacher-forced total log-prob [B] of each suffix + EOS after its prefix."""
    images = self._check_batch(images, ("prefixes", prefixes), ("suffixes", suffixes))
    rows = []
    for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
      head = self._prefix_ids(prefix)
      tail = self.tokenizer.encode(suffix, eos=True)
      if len(head) + 1 > self.max_prompt_len or len(tail) > self.max_decode_len:
        raise DecodeError(
            f"example {i}: prefix {len(head) + 1} tokens (max_prompt_len={self.max_prompt_len}) "
            f"and suffix+EOS {len(tail)} tokens (max_decode_len={self.max_decode_len}): too long.")
      rows.append((head, tail))
    length = _bucket(max(len(h) + 1 + len(t) for h, t in rows), self.length_bucket)
    text, mask_ar, mask_loss = (np.stack(a) for a in zip(
        *[ops_text.layout(h, self.tokenizer.sep_id, t, length) for h, t in rows]))
    n = len(rows)
    images, text, mask_ar, mask_loss = self._pad_batch([images, text, mask_ar, mask_loss], n)
    total, _ = self._score(params, images, text, mask_ar, mask_loss)
    return np.asarray(total)[:n]
