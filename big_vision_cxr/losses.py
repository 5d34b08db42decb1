"""The training loss: token cross-entropy over the suffix, per example.

-sum_t(w_t * log p(target_t)) / max(1, sum_t w_t), where w = mask_loss marks the
suffix tokens (EOS included); optional label smoothing and, for `<loc>`
targets, Gaussian soft targets over the location bins.
"""
import jax
import jax.numpy as jnp


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
