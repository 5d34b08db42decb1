"""losses.head_loss (the head on loss positions only) == the full-logits loss, value and grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_cxr import losses
from big_vision_cxr.models.gemma import softcap


def _reference(hidden, table, targets, weights, cap):
  logits = softcap(jnp.einsum("BTD,VD->BTV", hidden, table), cap)
  per_ex = losses.per_example_loss(logits, targets, weights)
  return per_ex.mean(), per_ex


@pytest.mark.parametrize("cap,chunk_rows", [(None, 512), (30.0, 512), (None, 4)])
def test_head_loss_equals_full_logits_loss(cap, chunk_rows):
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 9, 8, 50
  hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  weights = np.zeros((b, t), np.int32)
  weights[0, 3:7], weights[1, 1:9] = 1, 1  # Example 2 has no loss token at all.
  ours = lambda h, w: losses.head_loss(h, w, targets, weights, cap, chunk_rows)
  ref = lambda h, w: _reference(h, w, targets, weights, cap)
  (loss, per_ex), grads = jax.value_and_grad(ours, (0, 1), has_aux=True)(hidden, table)
  (ref_loss, ref_per_ex), ref_grads = jax.value_and_grad(ref, (0, 1), has_aux=True)(hidden, table)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(per_ex, ref_per_ex, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-6)
  assert not np.asarray(grads[0][2]).any()  # No loss position: no gradient.


@pytest.mark.parametrize("b,t,count,chunk_rows", [(3, 9, 8, 512), (4, 63, 48, 512), (8, 63, 5, 64)])
def test_head_rows_are_the_rows_the_head_computes(b, t, count, chunk_rows):
  """`head_rows` (what train_bench takes off its FLOP count) is what the compiled head
  computes: 3 products of 2 * rows * D * V FLOPs (one chunk here: the loop is counted once)."""
  d, v = 128, 4096  # The softmax's few FLOPs per logit are ~2% of the products' 6 * D.
  weights = np.zeros((b, t), np.int32)
  weights[:, :count] = 1
  grad = jax.grad(lambda h, w: losses.head_loss(h, w, jnp.zeros((b, t), jnp.int32), weights,
                                                None, chunk_rows)[0], (0, 1))
  cost = jax.jit(grad).lower(jnp.zeros((b, t, d)), jnp.zeros((v, d))).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  rows = losses.head_rows(b, t, count, chunk_rows)
  chunks = -(-count // losses._chunk_cols(b, t, chunk_rows))  # pylint: disable=protected-access
  assert flops == pytest.approx(6 * rows // chunks * d * v, rel=0.03)
