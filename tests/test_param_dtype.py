"""config.param_dtype='bfloat16': params and Adam's moments stored in bf16, half the state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _trainer_testlib as lib
from big_vision_cxr import checkpointing, config as config_lib, sharding, train
from big_vision_cxr.models import common as model_common


def _plan(config):
  model = model_common.build_model(config)
  mesh = sharding.create_mesh([("data", 1)], devices=jax.devices()[:1])
  return train.state_plan(config, model, mesh, config.total_steps)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_bf16_state_is_half_the_f32_state_and_mu_dtype_is_honoured():
  f32 = _plan(lib.tiny_config())
  bf16 = _plan(lib.tiny_config(param_dtype="bfloat16", optax=dict(mu_dtype="bfloat16")))
  assert {x.dtype for x in jax.tree.leaves(bf16.shape["params"])} == {jnp.dtype(jnp.bfloat16)}
  moments = [x for x in jax.tree.leaves(bf16.shape["opt"]) if x.ndim >= 1]
  assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
  ratio = _bytes(bf16.shape) / _bytes(f32.shape)
  assert 0.49 < ratio < 0.51, ratio


def test_bf16_params_train_checkpoint_and_resume_in_bf16(monkeypatch, tmp_path):
  monkeypatch.setattr(train, "make_tokenizer", lambda config: None)
  monkeypatch.setattr(train, "make_seg_codec", lambda config: None)
  monkeypatch.setattr(train, "make_train_iter", lambda config, *_, **__: lib.StandInBatches(
      config.input.batch_size, config.seed))
  config = lib.tiny_config(total_steps=8, ckpt_steps=4, param_dtype="bfloat16")
  summary = train.train(config, tmp_path)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(summary["state"]["params"]))
  losses = lib.read_losses(tmp_path)
  assert all(np.isfinite(list(losses.values())))
  assert losses[8] < losses[1] - 0.1, losses  # it learns the stand-in's small vocabulary
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  state, _ = ckpt.restore(8, _plan(config).abstract())
  ckpt.close()
  np.testing.assert_array_equal(
      np.asarray(state["params"]["llm"]["embedder"]["input_embedding"], np.float32),
      np.asarray(summary["state"]["params"]["llm"]["embedder"]["input_embedding"], np.float32))


def test_unknown_param_dtype_is_one_config_error():
  with pytest.raises(config_lib.ConfigError, match="param_dtype must be 'float32' or "
                                                    "'bfloat16', got 'float16'"):
    config_lib.validate(lib.tiny_config(param_dtype="float16"))
