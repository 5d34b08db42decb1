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


def _chunk_sizes(chunk):
  """The row counts a head chunk can take: 8, 16, ..., 128, then eight per doubling (each
  <= 1.125x the one before: 144, 160, ..., 256, 288, ...), and `chunk` itself last."""
  sizes, size, step = [], 8, 8
  while size < chunk:
    sizes.append(size)
    if size >= 16 * step:
      step *= 2
    size += step
  return sizes + [chunk]


def _split_rows(count, length, chunk_rows):
  """How `count` loss rows of a group of `length` meet the head: first a chunk of
  `sizes[branch]` >= rem rows (rem in 1..chunk; 0 rows when count is 0), then `full`
  chunks of `chunk` rows. Returns (chunk, sizes, branch, rem, full); sizes[0] is 0."""
  chunk = max(1, min(length, chunk_rows))
  sizes = [0] + _chunk_sizes(chunk)
  full = jnp.maximum(count - 1, 0) // chunk
  rem = count - full * chunk
  return chunk, sizes, jnp.searchsorted(jnp.asarray(sizes), rem), rem, full


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def head_loss(hidden, table, targets, weights, cap=None, chunk_rows=512, groups=1):
  """The tied head's token cross-entropy, applied only where `weights` > 0.

  hidden [B, T, D] (final-normed), table [V, D] (the tied embedding), targets, weights
  [B, T]; cap: the final logits softcap (None/0: none). Returns (mean over the batch,
  per-example [B]) = `per_example_loss(softcap(hidden @ table.T), targets, weights)`.
  The batch is cut into `groups` groups of B/groups examples (set it to the number of
  batch shards, so each device compacts its own); each group's loss positions are moved
  first and only those rows meet the [*, V] head: the fullest group's count, rounded up
  to a chunk size of `_chunk_sizes` (fewer than 8 rows or 12.5% more), in chunks of at
  most `chunk_rows / groups` rows. Each size is a branch of one compiled `lax.switch`,
  so no count recompiles anything.
  The mean is the differentiable output: being linear in the per-token terms with known
  weights, its gradient is formed chunk by chunk in the forward pass (softmax minus the
  target's one, then the two products), so no [B, T, V] buffer outlives a chunk.
  The per-example losses are for reporting: their cotangent is ignored.
  """
  return _head_loss_fwd(hidden, table, targets, weights, cap, chunk_rows, groups)[0]


def head_rows(count, length, chunk_rows=512, groups=1):
  """How many rows `head_loss` puts through the [*, V] head when each of its `groups`
  groups has `length` positions and the fullest has `count` loss positions."""
  chunk, sizes, branch, _, full = _split_rows(count, length, chunk_rows // groups)
  return groups * (int(full) * chunk + sizes[int(branch)])


def _head_loss_fwd(hidden, table, targets, weights, cap, chunk_rows, groups):
  b, t, _ = hidden.shape
  if b % groups:
    raise ValueError(f"head_loss: batch {b} does not split into groups={groups}.")
  weights = weights.astype(jnp.float32)
  coef = weights / jnp.maximum(1.0, weights.sum(-1, keepdims=True)) / b  # d(mean) / d(token loss)
  length = b // groups * t
  group = lambda x: x.reshape((groups, length) + x.shape[2:])  # [G, L, ...]
  order = jnp.argsort(group(weights) <= 0, axis=1, stable=True)  # Loss positions first.
  take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  h, tgt, cf = (take(group(x), order) for x in (hidden, targets, coef))
  count = jnp.max(jnp.sum(group(weights) > 0, axis=1))
  chunk, sizes, branch, rem, full = _split_rows(count, length, chunk_rows // groups)
  tab = table.astype(hidden.dtype)

  def rows(start, n, live):
    """Loss terms [G, n], dh [G, n, D], dtab [V, D] of rows start..start+n (rows past
    `live` count for nothing: a later chunk computes them)."""
    hc = jax.lax.dynamic_slice_in_dim(h, start, n, 1)  # [G, n, D]
    tc, cc = (jax.lax.dynamic_slice_in_dim(x, start, n, 1) for x in (tgt, cf))
    cc = jnp.where(jnp.arange(n) < live, cc, 0.0)
    logits = jnp.einsum("GnD,VD->GnV", hc, tab, preferred_element_type=jnp.float32)
    if cap:
      logits = jnp.tanh(logits / cap) * cap
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    tok = (jnp.log(total) + top - jnp.take_along_axis(logits, tc[..., None], -1))[..., 0]
    # softmax - one-hot, times the coefficient: the one-hot as n in-place updates.
    dlogits = (e * (cc[..., None] / total)).at[
        jnp.arange(tc.shape[0])[:, None], jnp.arange(n), tc].add(-cc, unique_indices=True)
    if cap:
      dlogits = dlogits * (1.0 - jnp.square(logits / cap))
    dlogits = dlogits.astype(tab.dtype)
    dh = jnp.einsum("GnV,VD->GnD", dlogits, tab, preferred_element_type=jnp.float32)
    return tok, dh, jnp.einsum("GnV,GnD->VD", dlogits, hc, preferred_element_type=jnp.float32)

  def first(n):  # The first rem rows, in a chunk of n >= rem rows (a switch branch).
    def branch():
      tok, dh, dtab = rows(0, n, rem)
      pad = lambda x: jnp.pad(x, [(0, 0), (0, length - n)] + [(0, 0)] * (x.ndim - 2))
      return pad(tok), pad(dh), dtab
    return branch

  def nothing():
    return (jnp.zeros((groups, length), jnp.float32), jnp.zeros(h.shape, jnp.float32),
            jnp.zeros(table.shape, jnp.float32))

  def full_chunk(i, carry):
    tok, dh, dtab = carry
    start = rem + i * chunk
    tok_c, dh_c, dtab_c = rows(start, chunk, chunk)
    return (jax.lax.dynamic_update_slice_in_dim(tok, tok_c, start, 1),
            jax.lax.dynamic_update_slice_in_dim(dh, dh_c, start, 1), dtab + dtab_c)

  tok, dh, dtab = jax.lax.switch(branch, [nothing] + [first(n) for n in sizes[1:]])
  if chunk < length:  # (Else there is no full chunk, and XLA would hoist the loop's body.)
    tok, dh, dtab = jax.lax.fori_loop(0, full, full_chunk, (tok, dh, dtab))
  # Back to the original positions through the inverse permutation.
  inverse = jnp.argsort(order, axis=1)
  tok, dh = (take(x, inverse).reshape((b, t) + x.shape[2:]) for x in (tok, dh))
  per_ex = jnp.sum(tok * weights, axis=1) / jnp.maximum(1.0, weights.sum(-1))
  return (jnp.mean(per_ex), per_ex), (dh.astype(hidden.dtype), dtab.astype(table.dtype),
                                      targets, weights)


def _head_loss_bwd(cap, chunk_rows, groups, res, g):
  del cap, chunk_rows, groups
  dh, dtab, targets, weights = res
  g_mean, _ = g  # The per-example output is not differentiated (see head_loss).
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (g_mean.astype(dh.dtype) * dh, g_mean.astype(dtab.dtype) * dtab, zero(targets),
          zero(weights) if not jnp.issubdtype(weights.dtype, jnp.floating) else
          jnp.zeros_like(weights))


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
