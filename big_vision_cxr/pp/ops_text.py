"""Text pp op: PaliGemma's prefix/suffix layout.

tokenize_train(text_len): BOS + prefix, the "\\n" separator as its own token,
  suffix + EOS; mask_ar and mask_loss are [0...0 | 0 | 1...1]; padded or plainly
  truncated (EOS can be cut) to text_len + 1 with pad text 0, mask_ar 1,
  mask_loss 0. Writes 'text', 'mask_ar', 'mask_loss' (int32).
`layout` is the layout itself, for callers that already hold token ids.
The tokenizer comes from the builder's context (`tokenizer=`) or, by default,
the demo asset. Encodings are memoised (prompts repeat).
"""
import functools

import numpy as np

from big_vision_cxr import tokenizer as tokenizer_lib
from big_vision_cxr.registry import PP_OPS


@functools.lru_cache(maxsize=4)
def default_tokenizer(path=tokenizer_lib.DEMO_TOKENIZER):
  """The shipped demo tokenizer (loaded once)."""
  return tokenizer_lib.Tokenizer(path)


def _encoder(tok):
  return functools.lru_cache(maxsize=1 << 16)(lambda text: tuple(tok.encode(text)))


def layout(prefix_ids, sep_id, suffix_ids, length, pad_mask_ar=1):
  """(text, mask_ar, mask_loss/input) int32 [length] from the three token pieces."""
  text = [*prefix_ids, sep_id, *suffix_ids]
  n_pre = len(prefix_ids) + 1
  mask_ar = [0] * n_pre + [1] * len(suffix_ids)
  loss = [0] * n_pre + [1] * len(suffix_ids)
  pad = max(0, length - len(text))
  text = np.asarray((text + [tokenizer_lib.PAD_ID] * pad)[:length], np.int32)
  mask_ar = np.asarray((mask_ar + [pad_mask_ar] * pad)[:length], np.int32)
  loss = np.asarray((loss + [0] * pad)[:length], np.int32)
  return text, mask_ar, loss


@PP_OPS.register("tokenize_train")
def get_tokenize_train(text_len, prefix_key="prefix", suffix_key="suffix", tokenizer=None):
  if not isinstance(text_len, int) or text_len < 2:
    raise ValueError(f"text_len must be an int >= 2, got {text_len!r}")
  tok = tokenizer or default_tokenizer()
  enc = _encoder(tok)

  def _tok(data):
    prefix = (tok.bos_id, *enc(str(data[prefix_key])))
    suffix = (*enc(str(data.get(suffix_key, ""))), tok.eos_id)
    text, mask_ar, mask_loss = layout(prefix, tok.sep_id, suffix, text_len + 1)
    return {**data, "text": text, "mask_ar": mask_ar, "mask_loss": mask_loss}
  return _tok
