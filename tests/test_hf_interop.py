"""Parity with HF transformers PaliGemma (eager, float32) and checkpoint conversion both ways."""
import json
import os

import jax
import numpy as np
import pytest

import hf_utils
from big_vision_cxr import convert
from big_vision_cxr import hf_interop
from big_vision_cxr import npz
from big_vision_cxr.models import paligemma as pg

TOL = 1e-4


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def case(request, tmp_path_factory):
  """HF model (PG1 with the hub's 64 extra embedding rows, PG2 without), its directory as
  save_pretrained writes it, our config and params imported from its state_dict."""
  kind = request.param
  hf_model = hf_utils.make_hf_model(kind, extra_vocab_rows=64 if kind == "pg1" else 0)
  hf_dir = tmp_path_factory.mktemp(f"hf_{kind}")
  hf_model.save_pretrained(hf_dir)
  cfg = hf_interop.config_from_hf(json.loads((hf_dir / "config.json").read_text()))
  params = hf_interop.params_from_hf(hf_model.state_dict(), cfg)
  model = pg.Model(**cfg.to_dict())
  forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a)[0])
  inputs = hf_utils.random_inputs()
  return kind, hf_model, hf_dir, cfg, params, forward, inputs


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_config_from_hf_matches_our_variant(case):
  kind, _, _, cfg, _, _, _ = case
  assert cfg.to_dict() == pg.get_config(hf_utils.OUR_VARIANT[kind]).to_dict()


def test_logits_match_hf_after_import(case):
  _, hf_model, _, _, params, forward, inputs = case
  ours = forward(params, *inputs)
  theirs = hf_utils.hf_text_logits(hf_model, *inputs)
  assert ours.shape == theirs.shape == (2, 7, hf_utils.VOCAB)
  diff = _max_diff(ours, theirs)
  print(f"HF -> ours logits max-abs-diff: {diff:.2e} (logits up to {np.abs(theirs).max():.1f})")
  assert diff < TOL


def test_gemma2_27b_style_query_scaling_matches_hf():
  hf_model = hf_utils.make_hf_model("pg2", seed=1, query_pre_attn_scalar=8)  # hidden 32 / 4 heads.
  cfg = hf_interop.config_from_hf(hf_model.config.to_dict())
  assert cfg.llm.query_pre_attn_norm == "rsqrt_emb_per_head"
  params = hf_interop.params_from_hf(hf_model.state_dict(), cfg)
  inputs = hf_utils.random_inputs(seed=1)
  ours, _ = pg.Model(**cfg.to_dict()).apply({"params": params}, *inputs)
  assert _max_diff(ours, hf_utils.hf_text_logits(hf_model, *inputs)) < TOL
  with pytest.raises(npz.CheckpointError, match="query_pre_attn_scalar 5"):
    hf_interop.config_from_hf(hf_utils.make_hf_model("pg2", query_pre_attn_scalar=5).config.to_dict())


def test_ours_to_hf_to_ours(case, tmp_path):
  _, hf_model, _, cfg, params, forward, inputs = case
  hf_interop.save_hf(params, cfg, tmp_path)
  exported, info = type(hf_model).from_pretrained(tmp_path, attn_implementation="eager",
                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert exported.config.text_config.vocab_size == 2368  # <image> row + padding to 64.
  ours = forward(params, *inputs)
  diff = _max_diff(ours, hf_utils.hf_text_logits(exported.eval(), *inputs))
  print(f"ours -> HF logits max-abs-diff: {diff:.2e}")
  assert diff < TOL
  back = hf_interop.params_from_hf(tmp_path)  # Config from the exported config.json.
  flat, flat_back = npz.flatten(params), npz.flatten(back)
  assert flat.keys() == flat_back.keys()
  for k in flat:
    np.testing.assert_array_equal(flat_back[k], flat[k], err_msg=k)
  diff = _max_diff(forward(back, *inputs), ours)
  assert diff == 0.0


def test_state_dict_round_trip_is_exact(case):
  _, hf_model, hf_dir, cfg, params, _, _ = case
  state_dict, hf_config = hf_interop.params_to_hf(params, cfg, vocab_pad_multiple=0)
  assert hf_config["image_token_index"] == hf_utils.VOCAB
  saved, _ = hf_interop.read_hf_dir(hf_dir)  # What HF's save_pretrained wrote.
  theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  assert {hf_interop._normalise_keys({k: 0}).popitem()[0] for k in state_dict} == \
      {hf_interop._normalise_keys({k: 0}).popitem()[0] for k in saved}
  by_internal = hf_interop._normalise_keys(theirs)
  for key, value in hf_interop._normalise_keys(state_dict).items():
    np.testing.assert_array_equal(value, by_internal[key][:value.shape[0]], err_msg=key)
  # The 5.x state_dict names and the file's names import to the same params.
  from_file = npz.flatten(hf_interop.params_from_hf(saved, cfg))
  for k, v in npz.flatten(params).items():
    np.testing.assert_array_equal(from_file[k], v, err_msg=k)


def test_convert_cli_both_ways(case, tmp_path, capsys):
  kind, hf_model, hf_dir, _, params, forward, inputs = case
  out = tmp_path / "model.npz"
  assert convert.main(["hf2bv", "--hf_dir", str(hf_dir), "--out", str(out)]) == 0
  loaded = pg.load(params, str(out))
  np.testing.assert_array_equal(forward(loaded, *inputs), forward(params, *inputs))
  variant = hf_utils.OUR_VARIANT[kind]
  assert convert.main(["bv2hf", "--npz", str(out), "--variant", variant,
                       "--out_dir", str(tmp_path / "hf")]) == 0
  exported = type(hf_model).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
  assert _max_diff(hf_utils.hf_text_logits(exported, *inputs), forward(params, *inputs)) < TOL
  other = "tiny_pg2" if variant == "tiny" else "tiny"
  assert convert.main(["bv2hf", "--npz", str(out), "--variant", other,
                       "--out_dir", str(tmp_path / "bad")]) == 1
  err = capsys.readouterr().err
  assert "model.npz" in err and ("post_ffw_norm" in err or "kv_einsum" in err)


def test_import_errors_name_the_weight(case, tmp_path):
  _, hf_model, _, cfg, _, _, _ = case
  sd = dict(hf_model.state_dict())
  key = "model.language_model.layers.1.mlp.down_proj.weight"
  with pytest.raises(npz.CheckpointError, match="lack 'layers.1.mlp.down_proj.weight'"):
    hf_interop.params_from_hf({k: v for k, v in sd.items() if k != key}, cfg)
  with pytest.raises(npz.CheckpointError, match="down_proj.weight' has shape .*\\(32, 7\\).*\\(32, 48\\)"):
    hf_interop.params_from_hf({**sd, key: sd[key][:, :7]}, cfg)
  with pytest.raises(npz.CheckpointError, match="not used by this config.*layers.2.input_layernorm"):
    hf_interop.params_from_hf({**sd, "model.language_model.layers.2.input_layernorm.weight":
                               sd["model.language_model.norm.weight"]}, cfg)
  with pytest.raises(npz.CheckpointError, match="unexpected HF weight 'text_model.foo'"):
    hf_interop.params_from_hf({**sd, "text_model.foo": sd[key]}, cfg)
  with pytest.raises(npz.CheckpointError, match="untied"):
    hf_interop.params_from_hf({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, cfg)


def test_directory_errors(case, tmp_path):
  _, _, hf_dir, _, _, _, _ = case
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(npz.CheckpointError, match="pytorch_model.bin.*refused"):
    hf_interop.params_from_hf(tmp_path)
  with pytest.raises(npz.CheckpointError, match="no config.json"):
    hf_interop.params_from_hf(tmp_path / "nowhere")
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(npz.CheckpointError, match="model.safetensors' is not a readable"):
    hf_interop.params_from_hf(tmp_path)
  config = json.loads((hf_dir / "config.json").read_text())
  with pytest.raises(npz.CheckpointError, match="model_type is 'llava'"):
    hf_interop.config_from_hf({**config, "model_type": "llava"})
  with pytest.raises(npz.CheckpointError, match="untied"):
    hf_interop.config_from_hf({**config, "tie_word_embeddings": False})
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "../../etc/passwd.safetensors"}}))
  with pytest.raises(npz.CheckpointError, match="not a plain .safetensors file name"):
    hf_interop.read_hf_dir(tmp_path)
  assert os.path.exists(hf_dir / "model.safetensors")


def test_bf16_conversion_keeps_bf16_both_ways(case, tmp_path):
  kind, _, _, cfg, params, _, _ = case
  npz.save_npz(params, tmp_path / "f32.npz")
  variant = hf_utils.OUR_VARIANT[kind]
  assert convert.main(["bv2hf", "--npz", str(tmp_path / "f32.npz"), "--variant", variant,
                       "--out_dir", str(tmp_path / "hf"), "--bf16"]) == 0
  state_dict, hf_config = hf_interop.read_hf_dir(tmp_path / "hf")
  assert hf_config["dtype"] == "bfloat16"
  assert {str(v.dtype) for v in state_dict.values()} == {"bfloat16"}
  assert convert.main(["hf2bv", "--hf_dir", str(tmp_path / "hf"), "--out",
                       str(tmp_path / "bf16.npz"), "--bf16"]) == 0
  with np.load(tmp_path / "bf16.npz", allow_pickle=False) as raw:
    assert raw["llm/layers/attn/q_einsum/w"].dtype == np.dtype("V2")
  flat = npz.flatten(params)
  for k, v in npz.load_npz(tmp_path / "bf16.npz").items():
    np.testing.assert_array_equal(v, flat[k].astype(v.dtype), err_msg=k)


# Hub-style config.json files leave out fields equal to the HF class defaults.
HUB_PG1_224 = {
    "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
    "hidden_size": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "vision_use_head": False},
}
HUB_PG2_28B_448 = {
    "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 4608,
    "hidden_size": 4608,
    "text_config": {"hidden_size": 4608, "intermediate_size": 36864, "model_type": "gemma2",
                    "num_attention_heads": 32, "num_hidden_layers": 46, "head_dim": 128,
                    "num_key_value_heads": 16, "query_pre_attn_scalar": 144,
                    "vocab_size": 257216, "hidden_activation": "gelu_pytorch_tanh"},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "image_size": 448,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}


@pytest.mark.parametrize("hub_config,variant", [(HUB_PG1_224, "pg1_3b_224"),
                                                (HUB_PG2_28B_448, "pg2_28b_448")])
def test_hub_style_configs_map_to_our_variants(hub_config, variant):
  assert hf_interop.config_from_hf(hub_config).to_dict() == pg.get_config(variant).to_dict()


def test_hf_defaults_table_matches_transformers():
  import transformers
  classes = {"siglip_vision_model": transformers.SiglipVisionConfig,
             "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}
  for model_type, defaults in hf_interop.HF_DEFAULTS.items():
    config = classes[model_type]()
    assert {k: getattr(config, k) for k in defaults} == defaults, model_type


def test_final_logits_softcap_30_and_0_match_hf_both_ways(tmp_path):
  """PG2 pt models cap the final logits at 30; big_vision fine-tunes PG2 with 0.0 (no cap):
  export writes the model's own value (null for 0), import reads it back."""
  hf_model = hf_utils.make_hf_model("pg2", seed=2, extra_vocab_rows=0)
  cfg = hf_interop.config_from_hf(hf_model.config.to_dict())
  params = hf_interop.params_from_hf(hf_model.state_dict(), cfg)
  inputs = hf_utils.random_inputs(seed=2)
  logits = {}
  for cap in (30.0, 0.0):
    cfg.llm.final_logits_softcap = cap
    out = tmp_path / f"cap{cap:g}"
    hf_interop.save_hf(params, cfg, out)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["text_config"]["final_logit_softcapping"] == (cap or None)
    assert hf_interop.config_from_hf(hf_config).to_dict() == cfg.to_dict()
    exported = type(hf_model).from_pretrained(out, attn_implementation="eager").eval()
    logits[cap], _ = pg.Model(**cfg.to_dict()).apply({"params": params}, *inputs)
    diff = _max_diff(logits[cap], hf_utils.hf_text_logits(exported, *inputs))
    print(f"final_logits_softcap={cap}: ours vs HF logits max-abs-diff {diff:.2e}")
    assert diff < TOL
  assert _max_diff(logits[30.0], logits[0.0]) > 1e-2  # The cap acts on these logits.


def test_save_hf_files_are_0644(case, tmp_path):
  _, _, _, cfg, params, _, _ = case
  umask = os.umask(0o022)
  try:
    hf_interop.save_hf(params, cfg, tmp_path / "hf")
  finally:
    os.umask(umask)
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
  for name in ("config.json", "model.safetensors"):
    assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o644, name
