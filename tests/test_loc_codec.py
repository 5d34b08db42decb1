"""Boxes <-> loc tokens, and the multi-object parser that must never raise."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from big_vision_cxr import loc_codec


@pytest.mark.parametrize("height,width", [(224, 224), (512, 512), (1024, 768), (37, 1999)])
def test_pixel_box_round_trip_within_one_bin(height, width):
  rng = np.random.default_rng(height * width)
  y = np.sort(rng.uniform(0, height, (200, 2)), axis=1)
  x = np.sort(rng.uniform(0, width, (200, 2)), axis=1)
  boxes_px = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)
  ids = loc_codec.box_to_loc_ids(loc_codec.pixels_to_normalized(boxes_px, height, width))
  back = loc_codec.normalized_to_pixels(loc_codec.loc_ids_to_box(ids), height, width)
  bin_px = np.array([height, width, height, width]) / 1023
  # Rounding to the nearest bin: error at most half a bin (plus float slack).
  assert np.all(np.abs(back - boxes_px) <= bin_px / 2 + 1e-3)


def test_encoding_matches_big_vision_rule():
  ids = loc_codec.box_to_loc_ids([0.0, 0.5, 1.0, 1.2])
  assert ids.tolist() == [0, 512, 1023, 1023]  # round(511.5)=512 (half to even), clip
  assert loc_codec.loc_tokens([0.1, 0.2, 0.3, 0.4]) == "<loc0102><loc0205><loc0307><loc0409>"
  assert np.allclose(loc_codec.loc_ids_to_box([0, 1023, 512, 1]), [0, 1, 512 / 1023, 1 / 1023])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_round_trip_property(coords):
  ids = loc_codec.box_to_loc_ids(coords)
  assert np.all(np.abs(loc_codec.loc_ids_to_box(ids) - np.array(coords)) <= 0.5 / 1023 + 1e-6)
  assert np.array_equal(loc_codec.box_to_loc_ids(loc_codec.loc_ids_to_box(ids)), ids)


def test_bad_boxes_raise_clear_errors():
  with pytest.raises(loc_codec.LocCodecError, match="last axis of 4"):
    loc_codec.box_to_loc_ids([0.1, 0.2, 0.3])
  with pytest.raises(loc_codec.LocCodecError, match="non-finite"):
    loc_codec.box_to_loc_ids([0.1, np.nan, 0.3, 0.4])
  with pytest.raises(loc_codec.LocCodecError, match="name"):
    loc_codec.format_objects([[0.1, 0.1, 0.2, 0.2]], ["a;b"])


def test_format_then_parse():
  boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
  seg = np.arange(32).reshape(2, 16)
  text = loc_codec.format_objects(boxes, ["active tb", "latent tb"], seg)
  assert text.count(" ; ") == 1
  res = loc_codec.parse_objects(text, require_seg=True)
  assert res.n_invalid == 0
  assert [o.name for o in res.objects] == ["active tb", "latent tb"]
  assert np.allclose([o.box for o in res.objects], boxes, atol=0.5 / 1023)
  assert np.array_equal(res.objects[1].seg_ids, seg[1])
  o = res.objects[0]
  assert text[o.loc_span[0]:o.loc_span[1]] == loc_codec.loc_tokens(boxes[0])
  assert text[o.token_span[0]:o.token_span[1]].endswith("active tb ")
  assert loc_codec.format_objects(np.zeros((0, 4)), []) == ""
  assert loc_codec.parse_objects("") == loc_codec.ParseResult([], 0)


def test_parser_keeps_valid_and_counts_invalid():
  good = "<loc0100><loc0100><loc0200><loc0200> active tb"
  reversed_ = "<loc0200><loc0100><loc0100><loc0200> active tb"
  three_locs = "<loc0100><loc0100><loc0200> latent tb"
  bad_seg = "<loc0100><loc0100><loc0200><loc0200>" + "<seg001>" * 5 + " active tb"
  no_name = "<loc0100><loc0100><loc0300><loc0300>"
  junk = "blah"
  text = " ; ".join([good, reversed_, three_locs, bad_seg, junk, good, no_name])
  res = loc_codec.parse_objects(text)
  assert len(res.objects) == 2 and res.n_invalid == 5
  # Truncated output: the last object is cut inside its loc tokens.
  res = loc_codec.parse_objects(good + " ; <loc0100><loc01")
  assert len(res.objects) == 1 and res.n_invalid == 1
  # Segmentation requires the 16 seg tokens.
  assert loc_codec.parse_objects(good, require_seg=True).n_invalid == 1
  assert loc_codec.parse_objects(None).n_invalid == 1


class _CharTokenizer:
  """Test double of tokenizer.Tokenizer: one id per character, loc/seg after 256."""
  eos_id = 1

  def loc_id(self, i):
    return 256 + i

  def seg_id(self, j):
    return 256 + 1024 + j

  def encode(self, text):
    ids = []
    for p in loc_codec._text_pieces(text):
      if p.kind == "loc":
        ids.append(self.loc_id(p.value))
      elif p.kind == "seg":
        ids.append(self.seg_id(p.value))
      else:
        ids.extend(ord(c) for c in p.value)
    return ids

  def decode(self, ids, stop_at_eos=True):
    out = []
    if any(i >= self.seg_id(128) for i in ids):
      raise ValueError(f"ids {ids} are outside the vocabulary")  # like tokenizer.TokenizerError
    for i in ids:
      if i >= self.seg_id(0):
        out.append(f"<seg{i - self.seg_id(0):03d}>")
      elif i >= self.loc_id(0):
        out.append(f"<loc{i - self.loc_id(0):04d}>")
      else:
        out.append(chr(i))
    return "".join(out)


def test_parse_token_ids_gives_token_spans():
  tok = _CharTokenizer()
  text = ("<loc0100><loc0100><loc0200><loc0200> active tb ; "
          "<loc0300><loc0300><loc0200><loc0400> junk ; <loc0010><loc0020><loc0030><loc0040> latent tb")
  ids = tok.encode(text) + [tok.eos_id, 65, 66]
  res = loc_codec.parse_token_ids(ids, tok)
  assert [o.name for o in res.objects] == ["active tb", "latent tb"]
  assert res.n_invalid == 1
  o0, o1 = res.objects
  assert o0.loc_span == (0, 4)
  assert tok.decode(ids[o0.token_span[0]:o0.token_span[1]]).startswith("<loc0100>")
  start = o1.loc_span[0]
  assert [ids[i] - tok.loc_id(0) for i in range(start, start + 4)] == [10, 20, 30, 40]
  assert o1.token_span[1] == len(tok.encode(text))
  # Ids beyond the tokenizer's vocabulary invalidate their object only.
  res = loc_codec.parse_token_ids(ids[:ids.index(tok.eos_id)] + [99999] + tok.encode(" active tb"), tok)
  assert [o.name for o in res.objects] == ["active tb"] and res.n_invalid == 2


_TOKEN_SOUP = st.lists(st.one_of(
    st.integers(0, 1023).map(lambda i: f"<loc{i:04d}>"),
    st.integers(0, 127).map(lambda i: f"<seg{i:03d}>"),
    st.sampled_from([" ; ", ";", " active tb", " latent tb", " ", "<loc12", "<seg", ">", "<", "x"]),
    st.text(max_size=5)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(_TOKEN_SOUP, st.booleans())
def test_parser_survives_fuzzing(parts, require_seg):
  text = "".join(parts)
  for cut in (len(text), len(text) // 2):
    res = loc_codec.parse_objects(text[:cut], require_seg=require_seg)
    for o in res.objects:
      assert o.box[2] > o.box[0] and o.box[3] > o.box[1]
      assert o.name and ";" not in o.name
      assert o.seg_ids is None or o.seg_ids.shape == (16,)
    assert res.n_invalid >= 0
  tok = _CharTokenizer()
  res_ids = loc_codec.parse_token_ids(tok.encode(text), tok, require_seg=require_seg)
  assert len(res_ids.objects) == len(loc_codec.parse_objects(text, require_seg=require_seg).objects)
