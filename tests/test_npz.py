"""big_vision .npz checkpoints: official layout, bf16 as V2, sub-trees, posemb, clear errors,
the fused qkv_einsum and unscanned ViT layouts."""
import os
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from big_vision_cxr import errors
from big_vision_cxr import npz
from big_vision_cxr.models import paligemma as pg
from big_vision_cxr.models import vit


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                                pg.param_shapes(cfg))


@pytest.fixture(scope="module")
def setup():
  cfg = pg.get_config("tiny").to_dict()
  model = pg.Model(**cfg)
  forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a)[0])
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  text = rng.integers(0, cfg["llm"]["vocab_size"], (2, 5)).astype(np.int32)
  mask_ar = np.array([[0, 0, 1, 1, 1]] * 2, np.int32)
  return cfg, forward, (image, text, mask_ar), _random_params(cfg, 1), _random_params(cfg, 2)


def _assert_trees_equal(a, b):
  fa, fb = npz.flatten(a), npz.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_official_layout_bf16_as_v2_loads_with_same_logits(setup, tmp_path):
  cfg, forward, inputs, params, _ = setup
  bf16 = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  path = tmp_path / "pt.npz"
  npz.save_npz(bf16, path, prefix="params/")
  with np.load(path, allow_pickle=False) as raw:  # The raw file, as big_vision writes it.
    assert raw["params/llm/layers/attn/kv_einsum/w"].dtype == np.dtype("V2")
    assert raw["params/llm/layers/attn/kv_einsum/w"].shape == (2, 2, 1, 32, 12)
    assert raw["params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 24, 40)
    assert set(raw.files) == {"params/" + k for k in npz.flatten(params)}
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
  loaded = pg.load(pg.param_shapes(cfg), str(path), cfg)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(loaded))
  as_f32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), bf16)
  _assert_trees_equal(loaded, as_f32)
  np.testing.assert_array_equal(forward(loaded, *inputs), forward(as_f32, *inputs))


def test_f32_without_prefix_round_trips_exactly(setup, tmp_path):
  cfg, forward, inputs, params, _ = setup
  path = tmp_path / "f32.npz"
  npz.save_npz(params, path)
  loaded = pg.load(params, str(path), cfg)
  _assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(forward(loaded, *inputs), forward(params, *inputs))


def test_subtree_selection_and_dont_load(setup, tmp_path):
  cfg, _, _, params_a, params_b = setup
  npz.save_npz(params_a, tmp_path / "a.npz")
  npz.save_npz(params_b, tmp_path / "b.npz", prefix="params/")
  only_img = pg.load(params_b, f"{tmp_path}/a.npz:img", cfg)
  _assert_trees_equal(only_img["img"], params_a["img"])
  _assert_trees_equal(only_img["llm"], params_b["llm"])
  mixed = pg.load(only_img, f"{tmp_path}/b.npz:llm", cfg)
  _assert_trees_equal(mixed["llm"], params_b["llm"])
  _assert_trees_equal(mixed["img"], params_a["img"])
  kept_head = pg.load(params_b, f"{tmp_path}/a.npz", cfg, dont_load=["img/head/.*"])
  np.testing.assert_array_equal(kept_head["img"]["head"]["kernel"], params_b["img"]["head"]["kernel"])
  np.testing.assert_array_equal(kept_head["img"]["embedding"]["kernel"],
                                params_a["img"]["embedding"]["kernel"])
  shapes = pg.param_shapes(cfg)  # Not loaded leaves stay as given (here: shapes to init later).
  partial = pg.load(shapes, f"{tmp_path}/a.npz:llm", cfg)
  assert isinstance(partial["img"]["head"]["kernel"], jax.ShapeDtypeStruct)
  np.testing.assert_array_equal(partial["llm"]["final_norm"]["scale"],
                                params_a["llm"]["final_norm"]["scale"])


def test_posemb_resampling(setup, tmp_path):
  cfg, _, _, params, _ = setup
  ramp = np.repeat(np.arange(2, dtype=np.float32), 2)  # 2x2 grid, value = row index.
  small = np.broadcast_to(ramp[None, :, None], (1, 4, 24)).copy()
  resampled = vit.resample_posemb(small, 16)
  assert resampled.shape == (1, 16, 24)
  rows = resampled[0, :, 0].reshape(4, 4)
  np.testing.assert_allclose(rows, np.repeat(np.array([0, 1 / 3, 2 / 3, 1])[:, None], 4, 1),
                             atol=1e-6)  # Linear, corners kept (zoom order=1).
  assert vit.resample_posemb(params["img"]["pos_embedding"], 16) is params["img"]["pos_embedding"]
  low_res = {**params, "img": {**params["img"], "pos_embedding": small}}
  npz.save_npz(low_res, tmp_path / "lowres.npz")
  loaded = pg.load(params, f"{tmp_path}/lowres.npz", cfg)
  np.testing.assert_allclose(loaded["img"]["pos_embedding"], resampled)
  with pytest.raises(ValueError, match="square"):
    vit.resample_posemb(small[:, :3], 16)


def test_key_and_shape_errors_name_the_params(setup, tmp_path):
  cfg, _, _, params, _ = setup
  flat = npz.flatten(params)
  missing = {k: v for k, v in flat.items() if k != "llm/final_norm/scale"}
  npz.save_npz(npz.unflatten(missing), tmp_path / "missing.npz")
  with pytest.raises(npz.CheckpointError, match="Missing in the file: \\['llm/final_norm/scale'\\]"):
    pg.load(params, f"{tmp_path}/missing.npz", cfg)
  extra = dict(flat, **{"llm/layers/bogus/w": np.zeros(3, np.float32)})
  npz.save_npz(npz.unflatten(extra), tmp_path / "extra.npz")
  with pytest.raises(npz.CheckpointError, match="Unexpected in the file: \\['llm/layers/bogus/w'\\]"):
    pg.load(params, f"{tmp_path}/extra.npz", cfg)
  wrong = dict(flat, **{"img/head/bias": np.zeros(7, np.float32)})
  npz.save_npz(npz.unflatten(wrong), tmp_path / "wrong.npz")
  with pytest.raises(npz.CheckpointError, match=r"'img/head/bias' has shape \(7,\) in the file "
                                                 r"but \(32,\) in the model"):
    pg.load(params, f"{tmp_path}/wrong.npz", cfg)
  with pytest.raises(npz.CheckpointError, match="no sub-tree 'vision'.*'img', 'llm'"):
    pg.load(params, f"{tmp_path}/wrong.npz:vision", cfg)
  npz.save_npz(params, tmp_path / "wrapped.npz", prefix="params/")
  with pytest.raises(npz.CheckpointError, match="no sub-tree 'img/nope'.*\\['img', 'llm'\\]"):
    pg.load(params, f"{tmp_path}/wrapped.npz:img/nope", cfg)


def test_subtree_reads_only_its_arrays(tmp_path, monkeypatch):
  npz.save_npz({"img": {"a": np.ones(2)}, "llm": {"b": np.zeros(3)}}, tmp_path / "m.npz",
               prefix="params/")
  read = []
  restore = npz._restore_dtype
  monkeypatch.setattr(npz, "_restore_dtype", lambda a: read.append(a.shape) or restore(a))
  tree = npz.load_tree(f"{tmp_path}/m.npz:llm")
  np.testing.assert_array_equal(tree["b"], np.zeros(3))
  assert read == [(3,)]


def test_bad_files_are_named(tmp_path):
  text_file = tmp_path / "notes.npz"
  text_file.write_text("not a checkpoint")
  with pytest.raises(npz.CheckpointError, match="notes.npz.*not an .npz archive"):
    npz.load_npz(text_file)
  npy = tmp_path / "array.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(npz.CheckpointError, match="array.npz.*not an .npz archive"):
    npz.load_npz(npy)
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, ok=np.zeros(2), evil=np.array([{"a": 1}], dtype=object))
  with pytest.raises(npz.CheckpointError, match="pickled.npz.*'evil'.*unpickling"):
    npz.load_npz(pickled)
  with pytest.raises(npz.CheckpointError, match="does not exist"):
    npz.load_npz(tmp_path / "absent.npz")
  truncated = tmp_path / "truncated.npz"
  np.savez(truncated, a=np.zeros(1000))
  truncated.write_bytes(truncated.read_bytes()[:300])
  with pytest.raises(npz.CheckpointError, match="truncated.npz"):
    npz.load_npz(truncated)
  with pytest.raises(npz.CheckpointError, match="not an .npz checkpoint path"):
    npz.split_spec("weights.safetensors")
  assert npz.split_spec("dir/x.npz:img") == ("dir/x.npz", "img")


def test_save_is_atomic_and_refuses_object_arrays(tmp_path):
  path = tmp_path / "ckpt.npz"
  npz.save_npz({"a": {"b": np.ones(3, np.float32)}}, path)
  before = path.read_bytes()
  with pytest.raises(npz.CheckpointError, match="'a/c' is an object array"):
    npz.save_npz({"a": {"b": np.zeros(3), "c": np.array([None], dtype=object)}}, path)
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]
  assert zipfile.is_zipfile(path)
  with pytest.raises(npz.CheckpointError, match="both an array and"):
    npz.unflatten({"a": 1, "a/b": 2})


def test_fused_qkv_einsum_loads_with_same_logits(tmp_path):
  """big_vision stores a Gemma with num_kv_heads == num_heads as one qkv_einsum."""
  cfg = pg.get_config("tiny").to_dict()
  cfg["llm"]["num_kv_heads"] = cfg["llm"]["num_heads"]
  params = _random_params(cfg, 3)
  flat = npz.flatten(params)
  attn = "llm/layers/attn/"
  q, kv = flat.pop(attn + "q_einsum/w"), flat.pop(attn + "kv_einsum/w")  # [L,N,D,H], [L,2,N,D,H]
  flat[attn + "qkv_einsum/w"] = np.concatenate([q[:, None], kv], axis=1)  # [L, 3, N, D, H]
  assert flat[attn + "qkv_einsum/w"].shape == (2, 3, 4, 32, 12)
  npz.save_npz(npz.unflatten(flat), tmp_path / "qkv.npz", prefix="params/")
  npz.save_npz(params, tmp_path / "split.npz")
  shapes = pg.param_shapes(cfg)
  fused, split = (pg.load(shapes, str(tmp_path / f"{n}.npz"), cfg) for n in ("qkv", "split"))
  _assert_trees_equal(fused, split)
  model = pg.Model(**cfg)
  rng = np.random.default_rng(0)
  inputs = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
            rng.integers(0, cfg["llm"]["vocab_size"], (2, 5)).astype(np.int32),
            np.array([[0, 0, 1, 1, 1]] * 2, np.int32))
  logits = lambda p: np.asarray(model.apply({"params": p}, *inputs)[0])
  np.testing.assert_array_equal(logits(fused), logits(split))
  only_llm = pg.load(shapes, f"{tmp_path}/qkv.npz:llm", cfg)  # Sub-tree loading converts too.
  _assert_trees_equal(only_llm["llm"], split["llm"])
  with pytest.raises(npz.CheckpointError, match=r"qkv.npz.*kv_einsum/w' has shape \(2, 2, 4"):
    pg.load(pg.param_shapes(pg.get_config("tiny").to_dict()), str(tmp_path / "qkv.npz"))
  both = dict(flat, **{attn + "q_einsum/w": q})
  npz.save_npz(npz.unflatten(both), tmp_path / "both.npz")
  with pytest.raises(npz.CheckpointError, match="both.npz.*qkv_einsum/w and .*q_einsum/w"):
    pg.load(shapes, str(tmp_path / "both.npz"), cfg)


def test_unscanned_vit_loads_with_same_logits(setup, tmp_path):
  cfg, forward, inputs, params, _ = setup
  flat = npz.flatten(params)
  scanned = "img/Transformer/encoderblock/"
  unscanned = {k: v for k, v in flat.items() if not k.startswith(scanned)}
  for k, v in flat.items():
    if k.startswith(scanned):
      for i in range(cfg["img"]["depth"]):
        unscanned[f"img/Transformer/encoderblock_{i}/{k[len(scanned):]}"] = v[i]
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in unscanned.items()}
  npz.save_npz(npz.unflatten(bf16), tmp_path / "unscanned.npz", prefix="params/")
  loaded = pg.load(pg.param_shapes(cfg), str(tmp_path / "unscanned.npz"), cfg)
  as_f32 = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  _assert_trees_equal(loaded, as_f32)
  np.testing.assert_array_equal(forward(loaded, *inputs), forward(as_f32, *inputs))
  only_img = pg.load(params, f"{tmp_path}/unscanned.npz:img", cfg)
  _assert_trees_equal(only_img["img"], as_f32["img"])
  mlp = "MlpBlock_0/Dense_0/bias"
  del unscanned[f"img/Transformer/encoderblock_1/{mlp}"]
  npz.save_npz(npz.unflatten(unscanned), tmp_path / "gap.npz")
  with pytest.raises(npz.CheckpointError, match=f"gap.npz.*of 2 blocks lacks .*encoderblock_1/{mlp}"):
    pg.load(params, str(tmp_path / "gap.npz"), cfg)


def test_checkpoint_error_is_the_project_one():
  assert npz.CheckpointError is errors.CheckpointError and issubclass(npz.CheckpointError, errors.Error)
