"""SentencePiece tokenizer with the PaliGemma layout, and training a small one.

Layout (the contract every other module relies on):
  pad 0, eos 1, bos 2, unk 3; "\\n" is a single token (`sep_id`);
  base vocabulary [0, base_size), then `<loc0000>`..`<loc1023>` at base_size + i,
  then `<seg000>`..`<seg127>` at base_size + 1024 + j.

The official `paligemma_tokenizer.model` already holds the loc/seg pieces at
256000..257151: it is validated and used as is. A plain model without them gets
them appended in memory (as USER_DEFINED pieces, so the text `<loc0123>` always
encodes to its single id). A model holding only some of them, or holding them
in another order, is rejected.

CLI: python -m big_vision_cxr.tokenizer train --corpus FILE --out FILE --vocab_size N
"""
import argparse
import os
import pathlib
import re
import sys
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from big_vision_cxr import atomic
from big_vision_cxr import errors

NUM_LOC = 1024
NUM_SEG = 128
DEMO_TOKENIZER = pathlib.Path(__file__).parent / "assets" / "cxr_demo_spm.model"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SEP = "\n"
_LOC_OR_SEG = re.compile(r"^<(loc\d{4}|seg\d{3})>$")


class TokenizerError(errors.Error):
  """A tokenizer file or argument that does not fit the PaliGemma layout."""


def loc_piece(i):
  return f"<loc{i:04d}>"


def seg_piece(j):
  return f"<seg{j:03d}>"


def extra_pieces():
  """The 1152 pieces PaliGemma appends, in order: loc then seg."""
  return [loc_piece(i) for i in range(NUM_LOC)] + [seg_piece(j) for j in range(NUM_SEG)]


def _check_text(text, where):
  """TokenizerError naming the position of a lone surrogate (text SentencePiece cannot take)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise TokenizerError(f"{where}: character {text[e.start]!r} at position {e.start} is a lone "
                         f"surrogate, not valid Unicode text.") from e


def _with_extra_pieces(proto, where):
  """Returns (serialized model, base_size) with loc/seg pieces at the end."""
  names = [p.piece for p in proto.pieces]
  found = [k for k, name in enumerate(names) if _LOC_OR_SEG.match(name)]
  extra = extra_pieces()
  if not found:
    for name in extra:
      proto.pieces.add(piece=name, score=0.0, type=sp_pb.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString(), len(names)
  base_size = len(names) - len(extra)
  if len(found) != len(extra) or base_size < 0 or names[base_size:] != extra:
    raise TokenizerError(
        f"{where}: holds {len(found)} <loc>/<seg> pieces (first {names[found[0]]!r} at id "
        f"{found[0]}) but PaliGemma needs all {NUM_LOC} <loc0000>..<loc1023> then all "
        f"{NUM_SEG} <seg000>..<seg127> at the end of the vocabulary, in that order.")
  return proto.SerializeToString(), base_size


class Tokenizer:
  """PaliGemma-layout SentencePiece tokenizer (see the module docstring)."""

  pad_id = PAD_ID
  eos_id = EOS_ID
  bos_id = BOS_ID
  unk_id = UNK_ID

  def __init__(self, model_file):
    self.model_file = os.fspath(model_file)
    try:
      with open(self.model_file, "rb") as f:
        blob = f.read()
    except OSError as e:
      raise TokenizerError(f"Cannot read tokenizer model {self.model_file!r}: {e}") from e
    proto = sp_pb.ModelProto()
    try:
      proto.ParseFromString(blob)
    except Exception as e:  # protobuf raises its own DecodeError.
      raise TokenizerError(f"{self.model_file!r} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
      raise TokenizerError(f"{self.model_file!r} is not a SentencePiece model (no pieces).")
    blob, self.base_size = _with_extra_pieces(proto, self.model_file)
    self._sp = spm.SentencePieceProcessor(model_proto=blob)
    self.vocab_size = self._sp.get_piece_size()
    self._check_layout()
    self.sep_id = self._single_id(SEP, "the separator '\\n'")

  def _check_layout(self):
    got = dict(pad=self._sp.pad_id(), eos=self._sp.eos_id(), bos=self._sp.bos_id(),
               unk=self._sp.unk_id())
    want = dict(pad=PAD_ID, eos=EOS_ID, bos=BOS_ID, unk=UNK_ID)
    if got != want:
      raise TokenizerError(f"{self.model_file!r}: special ids {got}, PaliGemma needs {want}.")
    for piece, i in [(loc_piece(0), self.loc_id(0)), (loc_piece(NUM_LOC - 1), self.loc_id(NUM_LOC - 1)),
                     (seg_piece(0), self.seg_id(0)), (seg_piece(NUM_SEG - 1), self.seg_id(NUM_SEG - 1))]:
      self._single_id(piece, f"the piece {piece}", expected=i)

  def _single_id(self, text, what, expected=None):
    ids = self._sp.encode(text)
    if len(ids) != 1 or (expected is not None and ids[0] != expected):
      raise TokenizerError(
          f"{self.model_file!r}: {what} encodes to {ids}, expected the single id "
          f"{expected if expected is not None else '(any)'}.")
    return ids[0]

  def loc_id(self, i):
    if not 0 <= i < NUM_LOC:
      raise TokenizerError(f"loc index {i} is outside [0, {NUM_LOC}).")
    return self.base_size + i

  def seg_id(self, j):
    if not 0 <= j < NUM_SEG:
      raise TokenizerError(f"seg index {j} is outside [0, {NUM_SEG}).")
    return self.base_size + NUM_LOC + j

  def encode(self, text, bos=False, eos=False):
    """Token ids of `text`; `<loc0123>`/`<seg045>` in the text become their single ids."""
    if not isinstance(text, str):
      raise TokenizerError(f"encode() takes a str, got {type(text).__name__}.")
    _check_text(text, "encode()")
    ids = self._sp.encode(text)
    return [BOS_ID] * bos + ids + [EOS_ID] * eos

  def decode(self, ids, stop_at_eos=True):
    """Text of `ids` (pad/bos/eos dropped); stops at the first EOS if `stop_at_eos`."""
    try:
      ids = [int(i) for i in ids]
    except (TypeError, ValueError) as e:
      raise TokenizerError(f"decode() takes integer ids: {e}") from e
    if stop_at_eos and EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise TokenizerError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
    return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

  def id_to_piece(self, i):
    return self._sp.id_to_piece(int(i))

  def serialized_model(self):
    """The SentencePiece model bytes with the loc/seg pieces (for exporting, e.g. to HF)."""
    return self._sp.serialized_model_proto()


def train(lines, out_path, vocab_size=1000, model_type="bpe"):
  """Trains a small SentencePiece model on `lines` and writes it to `out_path`.

  `vocab_size` is the base vocabulary (specials, the 256 byte pieces and "\\n"
  included); the written model has vocab_size + 1152 pieces once loc/seg are
  appended. Byte fallback and identity normalisation make every text round-trip
  (whitespace and newlines kept); one thread makes it deterministic.
  Returns the `Tokenizer` of the written file.
  """
  lines = [l for l in lines if l]
  if not lines:
    raise TokenizerError("train() needs at least one non-empty line of text.")
  for i, line in enumerate(lines):
    _check_text(line, f"train(): non-empty line {i}")
  if model_type not in ("bpe", "unigram"):
    raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
  minimum = 4 + 256 + 1 + 1
  if vocab_size < minimum:
    raise TokenizerError(f"vocab_size {vocab_size} is too small: the byte fallback alone needs {minimum}.")
  model = tempfile.SpooledTemporaryFile()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=[SEP], pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID,
        unk_id=UNK_ID, num_threads=1, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as e:
    raise TokenizerError(f"SentencePiece training failed for vocab_size={vocab_size} on "
                         f"{len(lines)} lines: {e}") from e
  model.seek(0)
  proto = sp_pb.ModelProto()
  proto.ParseFromString(model.read())
  blob, _ = _with_extra_pieces(proto, "freshly trained model")
  atomic.write_bytes(out_path, blob)
  return Tokenizer(out_path)


def run(argv):
  parser = errors.ArgumentParser(prog="python -m big_vision_cxr.tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train a small PaliGemma-layout tokenizer")
  p.add_argument("--corpus", required=True, help="text file, one sentence per line")
  p.add_argument("--out", required=True, help="output .model path (written atomically)")
  p.add_argument("--vocab_size", type=int, default=1000, help="base vocabulary size")
  p.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
  args = parser.parse_args(argv)
  try:
    with open(args.corpus, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise TokenizerError(f"corpus {args.corpus}: not UTF-8 text ({e}).") from e
  tok = train(lines, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
  print(f"Wrote {args.out}: base_size={tok.base_size} vocab_size={tok.vocab_size} sep_id={tok.sep_id}",
        file=sys.stderr)
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
