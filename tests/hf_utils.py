"""Tiny random HF PaliGemma models (float32, eager attention) and how to run them like ours.

Shared by the HF parity tests (models, checkpoint conversion, greedy generation):
  import hf_utils  # pytest puts tests/ on sys.path (no tests/__init__.py, on purpose)
Our matching configs are `paligemma.get_config("tiny")` (PG1) and `"tiny_pg2"` (PG2);
the HF configs below are written by hand so that the config conversion is tested too.
"""
import numpy as np
import torch
from transformers import PaliGemmaConfig
from transformers import PaliGemmaForConditionalGeneration

VOCAB = 2304  # Our tiny vocabulary; `<image>` is id VOCAB, as 257152 is for the real models.
OUR_VARIANT = {"pg1": "tiny", "pg2": "tiny_pg2"}


def hf_config(kind, extra_vocab_rows=64, query_pre_attn_scalar=12):
  """PG1: Gemma 1, MQA (1 KV head), heads*head_dim = 48 != hidden 32.
  PG2: Gemma 2, GQA (2 KV heads), attention/final softcaps, post-norms; queries scaled by
  query_pre_attn_scalar**-0.5 (head_dim 12 here; hidden/heads = 8 is the 27B-style scaling).
  `extra_vocab_rows` mimics the hub's padded embedding (the <image> row and padding)."""
  text = dict(vocab_size=VOCAB + extra_vocab_rows, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, head_dim=12,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)
  if kind == "pg1":
    text.update(model_type="gemma", num_key_value_heads=1)
  elif kind == "pg2":
    text.update(model_type="gemma2", num_key_value_heads=2, query_pre_attn_scalar=query_pre_attn_scalar,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096)
  else:
    raise ValueError(kind)
  vision = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8,
                vision_use_head=False)
  return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB,
                         projection_dim=32, hidden_size=32)


def make_hf_model(kind, seed=0, **config_kwargs):
  """A float32 eager HF model with every weight random (norm scales too), in eval mode.
  For generation parity pass extra_vocab_rows=0: HF could pick the random extra rows."""
  torch.manual_seed(seed)
  model = PaliGemmaForConditionalGeneration(hf_config(kind, **config_kwargs))
  with torch.no_grad():
    for name, param in model.named_parameters():
      std = 0.5 if "norm" in name else 0.15
      param.copy_(torch.randn_like(param) * std)
  model.set_attn_implementation("eager")
  return model.eval()


def random_inputs(batch=2, prefix_len=4, suffix_len=3, seed=0, image_size=32):
  """image [B,H,W,3] in [-1,1], text [B,T] ids (BOS first), mask_ar [B,T] (0 prefix, 1 suffix)."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  text = rng.integers(3, VOCAB, (batch, prefix_len + suffix_len)).astype(np.int32)
  text[:, 0] = 2
  mask_ar = np.array([[0] * prefix_len + [1] * suffix_len] * batch, np.int32)
  return image, text, mask_ar


def hf_inputs(model, image, text, mask_ar):
  """HF forward kwargs for our (image NHWC, text, mask_ar): `<image>` ids first,
  token_type_ids 0 on the prefix block / 1 on the suffix, explicit 0-indexed positions."""
  num_image = model.config.text_config.num_image_tokens
  batch = text.shape[0]
  ids = np.concatenate([np.full((batch, num_image), model.config.image_token_index), text], 1)
  token_type = np.concatenate([np.zeros((batch, num_image), np.int64), mask_ar], 1)
  length = ids.shape[1]
  return dict(
      input_ids=torch.tensor(ids, dtype=torch.long),
      pixel_values=torch.tensor(np.transpose(image, (0, 3, 1, 2))),
      attention_mask=torch.ones((batch, length), dtype=torch.long),
      token_type_ids=torch.tensor(token_type, dtype=torch.long),
      position_ids=torch.arange(length)[None].expand(batch, length))


def hf_text_logits(model, image, text, mask_ar):
  """HF logits [B, T, VOCAB] of the text positions (extra HF vocab rows cut off)."""
  with torch.no_grad():
    logits = model(**hf_inputs(model, image, text, mask_ar)).logits
  return logits[:, -text.shape[1]:, :VOCAB].float().numpy()
