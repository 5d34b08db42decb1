"""The training loss: token cross-entropy over the suffix, per example.

-sum_t(w_t * log p(target_t)) / max(1, sum_t w_t), where w = mask_loss marks the
suffix tokens (EOS included); optional label smoothing and, for `<loc>`
targets, Gaussian soft targets over the location bins.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def loc_soft_targets(targets, loc_start, num_loc, sigma_bins):
  """Gaussian soft targets over the loc bins for `<locDDDD>` targets.

  Returns (is_loc [B, T] bool, q [B, T, num_loc]): q sums to 1 over the bins,
  ∝ exp(-(i - t)^2 / (2 sigma^2)) around the target bin t (one-hot at sigma 0), so a
  near-miss bin is penalised less than a far one; q is meaningless where not is_loc.
  """
  bin_ = targets - loc_start  # [B, T]
  is_loc = (bin_ >= 0) & (bin_ < num_loc)
  bin_ = jnp.where(is_loc, bin_, 0)  # far-off bins would underflow to 0/0 = NaN (and NaN grads)
  dist = jnp.arange(num_loc)[None, None, :] - bin_[..., None]  # [B, T, num_loc]
  if sigma_bins == 0:
    return is_loc, (dist == 0).astype(jnp.float32)
  q = jnp.exp(-0.5 * jnp.square(dist / sigma_bins).astype(jnp.float32))
  return is_loc, q / q.sum(-1, keepdims=True)


def per_example_loss(logits, targets, weights, label_smoothing=0.0, loc_smoothing=None):
  """Weighted token cross-entropy per example; [B].

  `loc_smoothing=dict(loc_start, num_loc, sigma_bins)`: `<loc>` targets use the
  Gaussian soft target of `loc_soft_targets` (cross-entropy over the loc bins)
  instead of one-hot and `label_smoothing`; other tokens are unchanged.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
  if label_smoothing:
    v = logits.shape[-1]
    off = label_smoothing / (v - 1)
    tok = -((1.0 - label_smoothing - off) * target_logp + off * logp.sum(-1))
  else:
    tok = -target_logp
  if loc_smoothing:
    start, n = loc_smoothing["loc_start"], loc_smoothing["num_loc"]
    is_loc, q = loc_soft_targets(targets, start, n, loc_smoothing["sigma_bins"])
    loc_tok = -jnp.einsum("btl,btl->bt", q, logp[..., start:start + n])
    tok = jnp.where(is_loc, loc_tok, tok)
  weights = weights.astype(jnp.float32)
  return (tok * weights).sum(-1) / jnp.maximum(1.0, weights.sum(-1))


def _compact(x, order, width):
  """x [B, T, ...] -> [B, width, ...] taken in `order` [B, T] (padded with row 0)."""
  x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  return jnp.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss(hidden, table, targets, weights, cap=None, chunk_rows=512):
  """The tied head's token cross-entropy, applied only where `weights` > 0.

  hidden [B, T, D] (final-normed), table [V, D] (the tied embedding), targets, weights
  [B, T]; cap: the final logits softcap (None/0: none). Returns (mean over the batch,
  per-example [B]) = `per_example_loss(softcap(hidden @ table.T), targets, weights)`,
  but each example's loss positions are moved first and only the first
  max_b(count_b) of them meet the [*, V] head, in chunks of about `chunk_rows` rows.
  The mean is the differentiable output: being linear in the per-token terms with known
  weights, its gradient is formed chunk by chunk in the forward pass (softmax minus a
  one-hot compare, then the two products), so no [B, T, V] buffer outlives a chunk.
  The per-example losses are for reporting: their cotangent is ignored.
  """
  return _head_loss_fwd(hidden, table, targets, weights, cap, chunk_rows)[0]


def _chunk_cols(batch, length, chunk_rows):
  return max(1, min(length, chunk_rows // batch))


def head_rows(batch, length, max_count, chunk_rows=512):
  """How many rows `head_loss` puts through the [*, V] head for hidden [batch, length]
  whose examples have at most `max_count` loss positions (whole chunks of each example's
  compacted positions: rows past its own count are computed too, with weight 0)."""
  cols = _chunk_cols(batch, length, chunk_rows)
  return batch * cols * -(-max_count // cols)


def _head_loss_fwd(hidden, table, targets, weights, cap, chunk_rows):
  b, t, _ = hidden.shape
  weights = weights.astype(jnp.float32)
  order = jnp.argsort(weights <= 0, axis=1, stable=True)  # Loss positions first.
  cols = _chunk_cols(b, t, chunk_rows)
  width = -(-t // cols) * cols
  h, tgt, w = (_compact(x, order, width) for x in (hidden, targets, weights))
  coef = w / jnp.maximum(1.0, weights.sum(-1, keepdims=True)) / b  # d(mean) / d(token loss)
  n_chunks = (jnp.max(jnp.sum(weights > 0, axis=1)) + cols - 1) // cols
  tab = table.astype(hidden.dtype)

  def chunk(i, carry):
    tok, dh, dtab = carry
    s = i * cols
    hc = jax.lax.dynamic_slice_in_dim(h, s, cols, 1)  # [B, C, D]
    tc, cc = (jax.lax.dynamic_slice_in_dim(x, s, cols, 1) for x in (tgt, coef))
    logits = jnp.einsum("BCD,VD->BCV", hc, tab, preferred_element_type=jnp.float32)
    if cap:
      logits = jnp.tanh(logits / cap) * cap
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jnp.arange(logits.shape[-1]) == tc[..., None]
    tok_c = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    dlogits = cc[..., None] * (jnp.exp(logits - lse[..., None]) - hit)
    if cap:
      dlogits = dlogits * (1.0 - jnp.square(logits / cap))
    dlogits = dlogits.astype(tab.dtype)
    dh_c = jnp.einsum("BCV,VD->BCD", dlogits, tab, preferred_element_type=jnp.float32)
    dtab = dtab + jnp.einsum("BCV,BCD->VD", dlogits, hc, preferred_element_type=jnp.float32)
    return (jax.lax.dynamic_update_slice_in_dim(tok, tok_c, s, 1),
            jax.lax.dynamic_update_slice_in_dim(dh, dh_c, s, 1), dtab)

  init = (jnp.zeros((b, width), jnp.float32), jnp.zeros(h.shape, jnp.float32),
          jnp.zeros(table.shape, jnp.float32))
  tok, dh, dtab = jax.lax.fori_loop(0, n_chunks, chunk, init)
  per_ex = jnp.sum(tok * w, axis=1) / jnp.maximum(1.0, weights.sum(-1))
  # Back to the original positions: scatter the compacted rows' gradient through `order`.
  inverse = jnp.argsort(order, axis=1)
  dh = jnp.take_along_axis(dh[:, :t], inverse[..., None], axis=1)
  return (jnp.mean(per_ex), per_ex), (dh.astype(hidden.dtype), dtab.astype(table.dtype),
                                      targets, weights)


def _head_loss_bwd(cap, chunk_rows, res, g):
  del cap, chunk_rows
  dh, dtab, targets, weights = res
  g_mean, _ = g  # The per-example output is not differentiated (see head_loss).
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (g_mean.astype(dh.dtype) * dh, g_mean.astype(dtab.dtype) * dtab, zero(targets),
          zero(weights) if not jnp.issubdtype(weights.dtype, jnp.floating) else
          jnp.zeros_like(weights))


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
