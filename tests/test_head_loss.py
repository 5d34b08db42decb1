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


@pytest.mark.parametrize("cap,chunk_rows,groups,counts", [
    (None, 512, 1, [4, 9, 0]),  # Example 2 has no loss token at all.
    (30.0, 512, 1, [4, 9, 0]),
    (None, 4, 1, [4, 9, 0]),  # 13 rows: a first chunk of 1, then 3 of 4.
    (None, 512, 3, [4, 9, 0]),  # A group per example; one group empty.
    (None, 8, 1, [9, 8, 7]),  # 24 rows: exactly 3 chunks of 8.
    (None, 512, 1, [0, 0, 0])])
def test_head_loss_equals_full_logits_loss(cap, chunk_rows, groups, counts):
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 9, 8, 50
  hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  weights = np.zeros((b, t), np.int32)
  for i, count in enumerate(counts):  # Loss positions scattered, not a suffix.
    weights[i, rng.permutation(t)[:count]] = 1
  ours = lambda h, w: losses.head_loss(h, w, targets, weights, cap, chunk_rows, groups)
  ref = lambda h, w: _reference(h, w, targets, weights, cap)
  (loss, per_ex), grads = jax.value_and_grad(ours, (0, 1), has_aux=True)(hidden, table)
  (ref_loss, ref_per_ex), ref_grads = jax.value_and_grad(ref, (0, 1), has_aux=True)(hidden, table)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(per_ex, ref_per_ex, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-6)
  assert not np.asarray(grads[0])[weights == 0].any()  # No loss position: no gradient.


@pytest.mark.parametrize("count,length,chunk_rows,groups,rows", [
    (192, 252, 512, 1, 192),  # The bench's batch 4: its 192 loss positions exactly.
    (193, 252, 512, 1, 208),  # Rounded up to the next size: at most 1.125x from 128 rows.
    (5, 63, 512, 1, 8),
    (480, 510, 512, 1, 480),  # The bench's batch 2, text 256.
    (481, 510, 512, 1, 510),  # The last size is the whole group.
    (600, 2048, 512, 1, 600),  # 88 rows (a chunk of 88), then one of 512.
    (620, 2048, 512, 1, 624),  # 108 rows (a chunk of 112), then one of 512.
    (1024, 2048, 512, 1, 1024),  # Two whole chunks, no partial one.
    (100, 256, 512, 4, 416),  # 4 groups of 256 positions, the fullest with 100: 4 x 104.
    (0, 63, 512, 1, 0)])
def test_head_rows(count, length, chunk_rows, groups, rows):
  assert losses.head_rows(count, length, chunk_rows, groups) == rows


def test_each_branch_computes_its_chunk_size():
  """The compiled switch has a branch per chunk size, each with its three head products
  on exactly that many rows (what `head_rows` counts), and nothing else meets the head:
  XLA's count (the largest branch) is those three products on the whole group once."""
  b, t, d, v = 2, 100, 128, 1024  # The softmax's few FLOPs per logit: ~2% of 6 * D.
  weights = np.ones((b, t), np.int32)
  grad = jax.grad(lambda h, w: losses.head_loss(h, w, jnp.zeros((b, t), jnp.int32), weights)[0],
                  (0, 1))
  jaxpr = jax.make_jaxpr(grad)(jnp.zeros((b, t, d)), jnp.zeros((v, d))).jaxpr
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  rows = []
  for branch in cond.params["branches"]:
    shapes = [e.outvars[0].aval.shape for e in branch.jaxpr.eqns
              if e.primitive.name == "dot_general"]  # [G, n, V], [G, n, D], [V, D]
    rows.append(sorted((s[1], s[2]) for s in shapes if len(s) == 3))
  sizes = list(range(8, 129, 8)) + [144, 160, 176, 192, 200]
  assert rows == [[]] + [[(n, d), (n, v)] for n in sizes]
  cost = jax.jit(grad).lower(jnp.zeros((b, t, d)), jnp.zeros((v, d))).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  assert flops == pytest.approx(6 * b * t * d * v, rel=0.05)
