"""HF transformers PaliGemma (safetensors + config.json) <-> our big_vision param tree.

Import accepts the key prefixes of transformers 5.x `state_dict()` (`model.vision_tower.`,
`model.language_model.`, `model.multi_modal_projector.`, `lm_head.`) and of 4.x / hub files
(`vision_tower.vision_model.`, `language_model.model.`, `multi_modal_projector.`,
`language_model.lm_head.`). Export writes the hub layout, which 4.x and 5.x both load.
HF's embedding has rows beyond our vocabulary (the `<image>` id and padding to a multiple
of 64): they are dropped on import and zero-padded on export. Only safetensors are read;
.bin (pickle) weights are refused.
"""
import json
import os

import ml_collections
import numpy as np

from big_vision_cxr import atomic
from big_vision_cxr.errors import CheckpointError
from big_vision_cxr.npz import flatten
from big_vision_cxr.npz import unflatten

_PREFIXES = (  # Longest first: (HF prefix, internal section).
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
_EXPORT_PREFIX = {"vision.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.",
                  "text.": "language_model.model."}
_TANH_GELU = ("gelu_pytorch_tanh", "gelu", None)  # HF Gemma maps legacy "gelu" to tanh-GELU.
# HF config-class defaults for the fields we read: hub config.json files omit fields
# that equal them (e.g. PaliGemma 1 has no text head_dim, no vision image_size).
HF_DEFAULTS = {
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                vision_use_head=True),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   tie_word_embeddings=True),
}


def _require(cond, msg):
  if not cond:
    raise CheckpointError(msg)


def config_from_hf(hf_config):
  """HF PaliGemma config.json dict -> our ConfigDict(img=..., llm=...). Fields a hub
  config omits take the HF class defaults (HF_DEFAULTS)."""
  _require(hf_config.get("model_type") == "paligemma",
           f"config.json: model_type is {hf_config.get('model_type')!r}, expected 'paligemma'.")
  vis = {**HF_DEFAULTS["siglip_vision_model"], **(hf_config.get("vision_config") or {})}
  txt = hf_config.get("text_config") or {}
  model_type = txt.get("model_type", "gemma")
  _require(model_type in ("gemma", "gemma2"),
           f"config.json: text model_type {model_type!r} is not supported (gemma, gemma2).")
  txt = {**HF_DEFAULTS[model_type], **txt}
  _require(not vis["vision_use_head"], "config.json: vision_config.vision_use_head "
           "must be false (PaliGemma uses no MAP head).")
  _require(vis["hidden_act"] == "gelu_pytorch_tanh",
           f"config.json: vision hidden_act {vis.get('hidden_act')!r} is not supported.")
  act = txt.get("hidden_activation", txt.get("hidden_act"))
  _require(act in _TANH_GELU, f"config.json: text activation {act!r} is not supported.")
  for name, eps in (("vision_config", vis["layer_norm_eps"]), ("text_config", txt["rms_norm_eps"])):
    _require(abs(eps - 1e-6) < 1e-12, f"config.json: {name} norm eps {eps} != 1e-6.")
  theta = (txt.get("rope_parameters") or {}).get("rope_theta", txt.get("rope_theta", 10000.0))
  _require(theta == 10000.0, f"config.json: rope_theta {theta} != 10000.")
  _require(hf_config.get("tie_word_embeddings", True) and txt["tie_word_embeddings"],
           "config.json: untied lm_head is not supported (PaliGemma ties it to the embedding).")
  width, heads, head_dim = txt["hidden_size"], txt["num_attention_heads"], txt["head_dim"]
  image_token = hf_config.get("image_token_index", hf_config.get("image_token_id", 256000))
  llm = dict(vocab_size=min(txt["vocab_size"], image_token),
             width=width, depth=txt["num_hidden_layers"], mlp_dim=txt["intermediate_size"],
             num_heads=heads, num_kv_heads=txt["num_key_value_heads"], head_dim=head_dim)
  if model_type == "gemma2":
    scalar = txt["query_pre_attn_scalar"]
    if scalar == head_dim:
      query_norm = "rsqrt_head_dim"
    elif scalar == width // heads:
      query_norm = "rsqrt_emb_per_head"
    else:
      raise CheckpointError(f"config.json: query_pre_attn_scalar {scalar} is neither head_dim "
                            f"{head_dim} nor hidden_size/heads {width // heads}.")
    llm.update(post_norms=True, attn_logits_softcap=txt.get("attn_logit_softcapping"),
               final_logits_softcap=txt.get("final_logit_softcapping") or 0.0,  # null: none.
               query_pre_attn_norm=query_norm)
  img = dict(image_size=vis["image_size"], patch_size=vis["patch_size"],
             width=vis["hidden_size"], depth=vis["num_hidden_layers"],
             mlp_dim=vis["intermediate_size"], num_heads=vis["num_attention_heads"])
  return ml_collections.ConfigDict(dict(img=img, llm=llm))


def hf_config_from_ours(model_cfg, vocab_pad_multiple=64, dtype="float32"):
  """Our ConfigDict -> HF PaliGemma config.json dict (the `<image>` id is our vocab size).
  The softcaps are the model's own (final_logit_softcapping null for a model trained
  with final_logits_softcap 0, as big_vision fine-tunes PaliGemma 2)."""
  img, llm = model_cfg["img"], model_cfg["llm"]
  vocab = llm["vocab_size"]
  hf_vocab = _padded_vocab(vocab, vocab_pad_multiple)
  gemma2 = bool(llm.get("post_norms", False))
  text = dict(
      model_type="gemma2" if gemma2 else "gemma", vocab_size=hf_vocab,
      hidden_size=llm["width"], intermediate_size=llm["mlp_dim"],
      num_hidden_layers=llm["depth"], num_attention_heads=llm["num_heads"],
      num_key_value_heads=llm["num_kv_heads"], head_dim=llm["head_dim"],
      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
      max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2,
      tie_word_embeddings=True)
  if gemma2:
    emb_per_head = llm.get("query_pre_attn_norm", "rsqrt_head_dim") == "rsqrt_emb_per_head"
    text.update(
        query_pre_attn_scalar=llm["width"] // llm["num_heads"] if emb_per_head else llm["head_dim"],
        attn_logit_softcapping=llm.get("attn_logits_softcap") or None,
        final_logit_softcapping=llm.get("final_logits_softcap") or None,
        # big_vision has no sliding window: make every HF layer global to match it.
        sliding_window=4096, layer_types=["full_attention"] * llm["depth"])
  vision = dict(
      model_type="siglip_vision_model", hidden_size=img["width"],
      intermediate_size=img["mlp_dim"], num_hidden_layers=img["depth"],
      num_attention_heads=img["num_heads"], image_size=img["image_size"],
      patch_size=img["patch_size"], num_channels=3, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6, vision_use_head=False, projection_dim=llm["width"])
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              image_token_index=vocab, projection_dim=llm["width"], hidden_size=llm["width"],
              tie_word_embeddings=True, dtype=dtype, text_config=text, vision_config=vision)


def _padded_vocab(vocab, multiple):
  if not multiple:
    return vocab
  return -(-(vocab + 1) // multiple) * multiple  # Room for <image>, rounded up.


def _normalise_keys(state_dict):
  out = {}
  for key, value in state_dict.items():
    for prefix, section in _PREFIXES:
      if key.startswith(prefix):
        out[section + key[len(prefix):]] = value
        break
    else:
      raise CheckpointError(f"unexpected HF weight {key!r} (not a PaliGemma key).")
  return out


def _to_numpy(value):
  if hasattr(value, "detach"):  # A torch tensor; bf16 goes through float32 exactly.
    import ml_dtypes
    import torch
    if value.dtype == torch.bfloat16:
      return value.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return value.detach().cpu().numpy()
  return np.asarray(value)


def params_from_hf(state_dict_or_dir, config=None):
  """HF weights (a state dict of torch/numpy arrays, or a save_pretrained directory) ->
  our nested params (numpy). `config` is our model config; for a directory it defaults to
  the one derived from its config.json."""
  if isinstance(state_dict_or_dir, (str, os.PathLike)):
    state_dict, hf_config = read_hf_dir(state_dict_or_dir)
    config = config or config_from_hf(hf_config)
  elif config is None:
    raise ValueError("params_from_hf needs our model config when given a state dict.")
  else:
    state_dict = state_dict_or_dir
  sd = {k: _to_numpy(v) for k, v in _normalise_keys(state_dict).items()}
  used = set()

  def take(key, shape):
    if key not in sd:
      raise CheckpointError(f"HF weights lack {key.split('.', 1)[1]!r} ({key.split('.')[0]}).")
    if shape is not None and sd[key].shape != shape:
      raise CheckpointError(f"HF weight {key.split('.', 1)[1]!r} has shape {sd[key].shape}, "
                            f"the config needs {shape}.")
    used.add(key)
    return sd[key]

  img, llm = config["img"], config["llm"]
  c, heads, f, patch = img["width"], img["num_heads"], img["mlp_dim"], img["patch_size"]
  tokens = (img["image_size"] // patch) ** 2
  n, k, h, d, g = (llm["num_heads"], llm["num_kv_heads"], llm["head_dim"], llm["width"],
                   llm["mlp_dim"])
  p = {}
  v = "vision."
  p["img/embedding/kernel"] = take(v + "embeddings.patch_embedding.weight",
                                   (c, 3, patch, patch)).transpose(2, 3, 1, 0)
  p["img/embedding/bias"] = take(v + "embeddings.patch_embedding.bias", (c,))
  p["img/pos_embedding"] = take(v + "embeddings.position_embedding.weight", (tokens, c))[None]
  p["img/Transformer/encoder_norm/scale"] = take(v + "post_layernorm.weight", (c,))
  p["img/Transformer/encoder_norm/bias"] = take(v + "post_layernorm.bias", (c,))
  p["img/head/kernel"] = take("projector.linear.weight", (d, c)).T
  p["img/head/bias"] = take("projector.linear.bias", (d,))
  vit_layers = []
  for i in range(img["depth"]):
    t = lambda name, shape: take(f"{v}encoder.layers.{i}.{name}", shape)
    layer = {
        "LayerNorm_0/scale": t("layer_norm1.weight", (c,)),
        "LayerNorm_0/bias": t("layer_norm1.bias", (c,)),
        "LayerNorm_1/scale": t("layer_norm2.weight", (c,)),
        "LayerNorm_1/bias": t("layer_norm2.bias", (c,)),
        "MlpBlock_0/Dense_0/kernel": t("mlp.fc1.weight", (f, c)).T,
        "MlpBlock_0/Dense_0/bias": t("mlp.fc1.bias", (f,)),
        "MlpBlock_0/Dense_1/kernel": t("mlp.fc2.weight", (c, f)).T,
        "MlpBlock_0/Dense_1/bias": t("mlp.fc2.bias", (c,)),
        "MultiHeadDotProductAttention_0/out/kernel":
            t("self_attn.out_proj.weight", (c, c)).T.reshape(heads, -1, c),
        "MultiHeadDotProductAttention_0/out/bias": t("self_attn.out_proj.bias", (c,)),
    }
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      mha = "MultiHeadDotProductAttention_0/" + ours
      layer[mha + "/kernel"] = t(f"self_attn.{theirs}_proj.weight", (c, c)).T.reshape(c, heads, -1)
      layer[mha + "/bias"] = t(f"self_attn.{theirs}_proj.bias", (c,)).reshape(heads, -1)
    vit_layers.append(layer)
  for name in vit_layers[0]:
    p["img/Transformer/encoderblock/" + name] = np.stack([l[name] for l in vit_layers])

  x = "text."
  embedding = take(x + "embed_tokens.weight", None)
  _require(embedding.ndim == 2 and embedding.shape[0] >= llm["vocab_size"]
           and embedding.shape[1] == d, f"HF embed_tokens has shape {embedding.shape}, the config "
           f"needs ({llm['vocab_size']} or more, {d}).")
  p["llm/embedder/input_embedding"] = embedding[:llm["vocab_size"]]
  if "lm_head.weight" in sd:
    _require(np.array_equal(take("lm_head.weight", embedding.shape), embedding),
             "HF lm_head.weight differs from embed_tokens.weight: untied heads are not supported.")
  p["llm/final_norm/scale"] = take(x + "norm.weight", (d,))
  gemma2 = bool(llm.get("post_norms", False))
  norms = {"pre_attention_norm": "input_layernorm"}
  if gemma2:
    norms.update(pre_ffw_norm="pre_feedforward_layernorm",
                 post_attention_norm="post_attention_layernorm",
                 post_ffw_norm="post_feedforward_layernorm")
  else:
    norms.update(pre_ffw_norm="post_attention_layernorm")  # HF Gemma 1's name for it.
  llm_layers = []
  for i in range(llm["depth"]):
    t = lambda name, shape: take(f"{x}layers.{i}.{name}", shape)
    heads_in = lambda w, m: w.reshape(m, h, d).transpose(0, 2, 1)  # (m*H, D) -> (m, D, H)
    layer = {
        "attn/q_einsum/w": heads_in(t("self_attn.q_proj.weight", (n * h, d)), n),
        "attn/kv_einsum/w": np.stack([heads_in(t("self_attn.k_proj.weight", (k * h, d)), k),
                                      heads_in(t("self_attn.v_proj.weight", (k * h, d)), k)]),
        "attn/attn_vec_einsum/w": t("self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d),
        "mlp/gating_einsum": np.stack([t("mlp.gate_proj.weight", (g, d)).T,
                                       t("mlp.up_proj.weight", (g, d)).T]),
        "mlp/linear": t("mlp.down_proj.weight", (d, g)).T,
    }
    for ours, theirs in norms.items():
      layer[ours + "/scale"] = t(theirs + ".weight", (d,))
    llm_layers.append(layer)
  for name in llm_layers[0]:
    p["llm/layers/" + name] = np.stack([l[name] for l in llm_layers])
  unused = sorted(set(sd) - used)
  _require(not unused, f"HF weights not used by this config (wrong depth or norms?): {unused}.")
  return unflatten({name: np.ascontiguousarray(a) for name, a in p.items()})


def params_to_hf(params, model_cfg, vocab_pad_multiple=64, dtype=None):
  """Our params -> (HF state dict of numpy arrays in the hub key layout, config.json dict).
  The embedding is zero-padded to the HF vocabulary (room for `<image>`, multiple of 64)."""
  f = {name: np.asarray(a) for name, a in flatten(params).items()}
  if dtype is not None:
    f = {name: a.astype(dtype) for name, a in f.items()}
  img, llm = model_cfg["img"], model_cfg["llm"]
  sd = {}
  v = "vision."
  sd[v + "embeddings.patch_embedding.weight"] = f["img/embedding/kernel"].transpose(3, 2, 0, 1)
  sd[v + "embeddings.patch_embedding.bias"] = f["img/embedding/bias"]
  sd[v + "embeddings.position_embedding.weight"] = f["img/pos_embedding"][0]
  sd[v + "post_layernorm.weight"] = f["img/Transformer/encoder_norm/scale"]
  sd[v + "post_layernorm.bias"] = f["img/Transformer/encoder_norm/bias"]
  sd["projector.linear.weight"] = f["img/head/kernel"].T
  sd["projector.linear.bias"] = f["img/head/bias"]
  blk = lambda name, i: f["img/Transformer/encoderblock/" + name][i]
  for i in range(img["depth"]):
    pre = f"{v}encoder.layers.{i}."
    sd[pre + "layer_norm1.weight"] = blk("LayerNorm_0/scale", i)
    sd[pre + "layer_norm1.bias"] = blk("LayerNorm_0/bias", i)
    sd[pre + "layer_norm2.weight"] = blk("LayerNorm_1/scale", i)
    sd[pre + "layer_norm2.bias"] = blk("LayerNorm_1/bias", i)
    sd[pre + "mlp.fc1.weight"] = blk("MlpBlock_0/Dense_0/kernel", i).T
    sd[pre + "mlp.fc1.bias"] = blk("MlpBlock_0/Dense_0/bias", i)
    sd[pre + "mlp.fc2.weight"] = blk("MlpBlock_0/Dense_1/kernel", i).T
    sd[pre + "mlp.fc2.bias"] = blk("MlpBlock_0/Dense_1/bias", i)
    out = blk("MultiHeadDotProductAttention_0/out/kernel", i)  # [h, d, C]
    sd[pre + "self_attn.out_proj.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[pre + "self_attn.out_proj.bias"] = blk("MultiHeadDotProductAttention_0/out/bias", i)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      kernel = blk(f"MultiHeadDotProductAttention_0/{ours}/kernel", i)  # [C, h, d]
      sd[pre + f"self_attn.{theirs}_proj.weight"] = kernel.reshape(kernel.shape[0], -1).T
      sd[pre + f"self_attn.{theirs}_proj.bias"] = blk(
          f"MultiHeadDotProductAttention_0/{ours}/bias", i).reshape(-1)

  x = "text."
  embedding = f["llm/embedder/input_embedding"]
  rows = _padded_vocab(embedding.shape[0], vocab_pad_multiple) - embedding.shape[0]
  sd[x + "embed_tokens.weight"] = np.pad(embedding, ((0, rows), (0, 0)))
  sd[x + "norm.weight"] = f["llm/final_norm/scale"]
  gemma2 = bool(llm.get("post_norms", False))
  lyr = lambda name, i: f["llm/layers/" + name][i]
  heads_out = lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1])  # (m, D, H) -> (m*H, D)
  for i in range(llm["depth"]):
    pre = f"{x}layers.{i}."
    kv = lyr("attn/kv_einsum/w", i)
    vec = lyr("attn/attn_vec_einsum/w", i)  # [N, H, D]
    gating = lyr("mlp/gating_einsum", i)
    sd[pre + "self_attn.q_proj.weight"] = heads_out(lyr("attn/q_einsum/w", i))
    sd[pre + "self_attn.k_proj.weight"] = heads_out(kv[0])
    sd[pre + "self_attn.v_proj.weight"] = heads_out(kv[1])
    sd[pre + "self_attn.o_proj.weight"] = vec.reshape(-1, vec.shape[-1]).T  # (D, N*H)
    sd[pre + "mlp.gate_proj.weight"] = gating[0].T
    sd[pre + "mlp.up_proj.weight"] = gating[1].T
    sd[pre + "mlp.down_proj.weight"] = lyr("mlp/linear", i).T
    sd[pre + "input_layernorm.weight"] = lyr("pre_attention_norm/scale", i)
    if gemma2:
      sd[pre + "pre_feedforward_layernorm.weight"] = lyr("pre_ffw_norm/scale", i)
      sd[pre + "post_attention_layernorm.weight"] = lyr("post_attention_norm/scale", i)
      sd[pre + "post_feedforward_layernorm.weight"] = lyr("post_ffw_norm/scale", i)
    else:
      sd[pre + "post_attention_layernorm.weight"] = lyr("pre_ffw_norm/scale", i)
  state_dict = {}
  for key, value in sd.items():
    section, rest = key.split(".", 1)
    state_dict[_EXPORT_PREFIX[section + "."] + rest] = np.ascontiguousarray(value)
  dtype_name = str(np.dtype(dtype or embedding.dtype))
  return state_dict, hf_config_from_ours(model_cfg, vocab_pad_multiple, dtype_name)


def read_hf_dir(hf_dir):
  """A save_pretrained directory -> (state dict of numpy arrays, config.json dict).
  Reads model.safetensors or the shards of model.safetensors.index.json."""
  from safetensors.numpy import load_file
  hf_dir = os.fspath(hf_dir)
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{hf_dir!r} has no config.json (not a save_pretrained directory).")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path!r} is not valid JSON: {e}") from None
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    shards = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f).get("weight_map", {}).values()))
    for name in names:
      _require(os.path.basename(name) == name and name.endswith(".safetensors"),
               f"{index!r}: shard name {name!r} is not a plain .safetensors file name.")
    shards = [os.path.join(hf_dir, name) for name in names]
  else:
    pickled = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    raise CheckpointError(f"{hf_dir!r} has no model.safetensors (or index)"
                          + (f"; pickle-based weights {pickled} are refused, convert them to "
                             "safetensors first" if pickled else "") + ".")
  state_dict = {}
  for shard in shards:
    _require(os.path.isfile(shard), f"safetensors shard {shard!r} is missing.")
    try:
      state_dict.update(load_file(shard))
    except Exception as e:  # safetensors raises its own error types for corrupt files.
      raise CheckpointError(f"{shard!r} is not a readable safetensors file: {e}") from None
  return state_dict, hf_config


def save_hf(params, model_cfg, out_dir, vocab_pad_multiple=64, dtype=None):
  """Writes config.json + model.safetensors that PaliGemmaForConditionalGeneration
  .from_pretrained(out_dir) loads; each file atomically (big_vision_cxr/atomic.py)."""
  from safetensors.numpy import save_file
  state_dict, hf_config = params_to_hf(params, model_cfg, vocab_pad_multiple, dtype)
  with atomic.target(os.path.join(out_dir, "model.safetensors")) as tmp:
    save_file(state_dict, tmp, metadata={"format": "pt"})
  atomic.write_text(os.path.join(out_dir, "config.json"), json.dumps(hf_config, indent=2))
  return hf_config
