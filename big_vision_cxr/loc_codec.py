"""Boxes as `<locDDDD>` tokens, and the parser of multi-object model outputs.

A box is 4 tokens in the order y_min, x_min, y_max, x_max, each `round(v * 1023)`
of the normalised coordinate clipped to [0, 1023]; decoding divides by 1023
(big_vision's PaliGemma training and evaluation; the HF demo's /1024 is not used).

An output is objects joined by ` ; `, each `<loc>x4 [<seg>x16] name`. The parser
never raises on model output: it keeps the valid objects and counts the others.
"""
import dataclasses
import re

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr.tokenizer import NUM_LOC, NUM_SEG

SEGS_PER_MASK = 16
SEPARATOR = " ; "

_MARKER = re.compile(r"<loc(\d{4})>|<seg(\d{3})>")


class LocCodecError(errors.Error):
  """A box or token sequence given to the encoder is malformed."""


def box_to_loc_ids(boxes):
  """Normalised boxes [..., 4] (y_min, x_min, y_max, x_max) -> loc bins [..., 4] int32."""
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape[-1:] != (4,):
    raise LocCodecError(f"boxes must have a last axis of 4 (y_min, x_min, y_max, x_max), got shape {boxes.shape}.")
  if not np.all(np.isfinite(boxes)):
    raise LocCodecError(f"boxes contain non-finite values: {boxes}.")
  return np.clip(np.round(boxes * (NUM_LOC - 1)), 0, NUM_LOC - 1).astype(np.int32)


def loc_ids_to_box(ids):
  """Loc bins [..., 4] -> normalised boxes [..., 4] float32 (bin / 1023)."""
  return np.asarray(ids, np.float32) / (NUM_LOC - 1)


def pixels_to_normalized(boxes_px, height, width):
  """Pixel boxes [..., 4] (y_min, x_min, y_max, x_max) of an HxW image -> [0, 1]."""
  scale = np.array([height, width, height, width], np.float64)
  return (np.asarray(boxes_px, np.float64) / scale).astype(np.float32)


def normalized_to_pixels(boxes, height, width):
  """Normalised boxes [..., 4] -> pixel coordinates (float) of an HxW image."""
  scale = np.array([height, width, height, width], np.float64)
  return np.asarray(boxes, np.float64) * scale


def loc_tokens(box):
  """One normalised box -> '<loc....>' x 4."""
  return "".join(f"<loc{i:04d}>" for i in box_to_loc_ids(box).reshape(4))


def seg_tokens(seg_ids):
  """16 codebook indices -> '<seg...>' x 16."""
  seg_ids = np.asarray(seg_ids).reshape(-1)
  if seg_ids.shape != (SEGS_PER_MASK,) or seg_ids.min() < 0 or seg_ids.max() >= NUM_SEG:
    raise LocCodecError(f"a mask needs {SEGS_PER_MASK} seg ids in [0, {NUM_SEG}), got {seg_ids.tolist()}.")
  return "".join(f"<seg{int(i):03d}>" for i in seg_ids)


def format_objects(boxes, names, seg_ids=None):
  """Boxes [n,4] normalised, names [n], optional seg ids [n,16] -> suffix text.

  No objects gives the empty string (the detection suffix of a normal image).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if len(names) != len(boxes) or (seg_ids is not None and len(seg_ids) != len(boxes)):
    raise LocCodecError(f"{len(boxes)} boxes but {len(names)} names"
                        + ("" if seg_ids is None else f" and {len(seg_ids)} seg id rows") + ".")
  parts = []
  for i, (box, name) in enumerate(zip(boxes, names)):
    if not name or any(c in name for c in ";<>"):
      raise LocCodecError(f"object name {name!r} must be non-empty and free of ';', '<', '>'.")
    seg = "" if seg_ids is None else seg_tokens(seg_ids[i])
    parts.append(f"{loc_tokens(box)}{seg} {name}")
  return SEPARATOR.join(parts)


@dataclasses.dataclass(frozen=True)
class Obj:
  """One parsed object.

  box: normalised (y_min, x_min, y_max, x_max) float32 [4]; loc_ids: the 4 bins;
  seg_ids: int32 [16] or None; name: stripped class name.
  loc_span / token_span: [start, end) of the 4 loc tokens / of the whole object
  (loc, seg and name tokens) in token indices when parsed from token ids, or in
  characters when parsed from text.
  """
  box: np.ndarray
  loc_ids: tuple
  seg_ids: np.ndarray | None
  name: str
  loc_span: tuple
  token_span: tuple


@dataclasses.dataclass(frozen=True)
class ParseResult:
  objects: list
  n_invalid: int


@dataclasses.dataclass
class _Piece:
  kind: str  # 'loc' | 'seg' | 'text' | 'junk'
  value: object  # int bin for loc/seg, str for text and junk
  start: int
  end: int


def _text_pieces(text):
  """Splits text into markers and text runs; spans are character offsets."""
  pieces, pos = [], 0
  for m in _MARKER.finditer(text):
    if m.start() > pos:
      pieces.append(_Piece("text", text[pos:m.start()], pos, m.start()))
    if m.group(1) is not None:
      pieces.append(_Piece("loc", int(m.group(1)), m.start(), m.end()))
    else:
      pieces.append(_Piece("seg", int(m.group(2)), m.start(), m.end()))
    pos = m.end()
  if pos < len(text):
    pieces.append(_Piece("text", text[pos:], pos, len(text)))
  return pieces


def _split_text_piece_chars(piece):
  """Splits a text piece at ';' -> list of pieces (character spans)."""
  out, start = [], piece.start
  for part in piece.value.split(";"):
    out.append(_Piece("text", part, start, start + len(part)))
    start += len(part) + 1
  return out


def _group(pieces, split_text):
  """Pieces -> groups of pieces, one group per ';'-separated segment."""
  groups = [[]]
  for p in pieces:
    if p.kind in ("loc", "seg"):
      groups[-1].append(p)
      continue
    parts = split_text(p)
    for i, part in enumerate(parts):
      if i:
        groups.append([])
      if part.value:
        groups[-1].append(part)
  return groups


def _parse_group(group, require_seg):
  """One segment's pieces -> Obj, None (blank) or 'invalid'."""
  pieces = [p for p in group if not (p.kind == "text" and not p.value.strip())]
  if not pieces:
    return None
  kinds = [p.kind for p in pieces]
  n_seg = 0
  while 4 + n_seg < len(kinds) and kinds[4 + n_seg] == "seg":
    n_seg += 1
  if kinds[:4] != ["loc"] * 4 or n_seg not in (0, SEGS_PER_MASK) or (require_seg and not n_seg):
    return "invalid"
  rest = pieces[4 + n_seg:]
  if len(rest) != 1 or rest[0].kind != "text":
    return "invalid"
  name = rest[0].value.strip()
  loc = tuple(int(p.value) for p in pieces[:4])
  if any(not 0 <= v < NUM_LOC for v in loc) or loc[2] <= loc[0] or loc[3] <= loc[1]:
    return "invalid"
  seg = None
  if n_seg:
    seg = np.array([p.value for p in pieces[4:4 + n_seg]], np.int32)
    if seg.min() < 0 or seg.max() >= NUM_SEG:
      return "invalid"
  return Obj(box=loc_ids_to_box(loc), loc_ids=loc, seg_ids=seg, name=name,
             loc_span=(pieces[0].start, pieces[3].end),
             token_span=(pieces[0].start, rest[0].end))


def _parse_pieces(pieces, split_text, require_seg):
  objects, n_invalid = [], 0
  for group in _group(pieces, split_text):
    parsed = _parse_group(group, require_seg)
    if parsed == "invalid":
      n_invalid += 1
    elif parsed is not None:
      objects.append(parsed)
  return ParseResult(objects=objects, n_invalid=n_invalid)


def parse_objects(text, *, require_seg=False):
  """Model output text -> ParseResult; spans are character offsets into `text`.

  An object is valid when it has exactly 4 loc tokens with y_max > y_min and
  x_max > x_min, then 0 or exactly 16 seg tokens (16 required if `require_seg`),
  then a non-empty name, and nothing else before the next ';'. Every other
  non-blank ';'-separated segment (truncated, reversed, junk) counts as invalid.
  """
  if not isinstance(text, str):
    return ParseResult(objects=[], n_invalid=1)
  return _parse_pieces(_text_pieces(text), _split_text_piece_chars, require_seg)


def parse_token_ids(token_ids, tokenizer, *, require_seg=False):
  """Generated token ids -> ParseResult; spans are token indices into `token_ids`.

  Uses the tokenizer's loc/seg id ranges and `decode` for text runs; tokens from
  the first EOS on are ignored.
  """
  ids = [int(t) for t in token_ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  loc0, seg0 = tokenizer.loc_id(0), tokenizer.seg_id(0)
  pieces, run_start = [], None

  def close_run(end):
    if run_start is not None and end > run_start:
      pieces.append(_Piece("text", tuple(range(run_start, end)), run_start, end))

  for i, t in enumerate(ids):
    if loc0 <= t < loc0 + NUM_LOC or seg0 <= t < seg0 + NUM_SEG:
      close_run(i)
      run_start = None
      kind = "loc" if loc0 <= t < loc0 + NUM_LOC else "seg"
      pieces.append(_Piece(kind, t - (loc0 if kind == "loc" else seg0), i, i + 1))
    elif run_start is None:
      run_start = i
  close_run(len(ids))

  def split_tokens(piece):
    """Splits a run of text tokens at the tokens whose text holds a ';'.

    Ids the tokenizer cannot decode (e.g. beyond its vocabulary) make a 'junk'
    piece, which invalidates its object.
    """
    out, start = [], piece.start
    try:
      for end in range(piece.start + 1, piece.end + 1):
        text = tokenizer.decode(ids[start:end], stop_at_eos=False)
        if ";" in text:
          out.append(_Piece("text", text.split(";")[0], start, end))
          start = end
      out.append(_Piece("text", tokenizer.decode(ids[start:piece.end], stop_at_eos=False), start, piece.end))
    except ValueError:
      out.append(_Piece("junk", "undecodable", start, piece.end))
    return out

  return _parse_pieces(pieces, split_tokens, require_seg)
