"""Tokenizer: PaliGemma id layout, round trips, official-layout detection, errors."""
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from big_vision_cxr import tokenizer as tk

CORPUS = [
    "Chest X-ray: cavity in the right upper lobe, suggestive of active tuberculosis.",
    "No active tuberculosis.  Heart size normal; lungs clear.",
    "Findings: consolidation 12 mm\twith small left pleural effusion.",
    "answer en is there tuberculosis?",
    "detect tb ; nodule",
] * 20
TEXTS = [
    "Cavity in the right upper lobe.",
    "two  spaces, a\ttab and\nnewlines\n\n",
    "unseen characters: ü 日本 ✓ 🫁",
    "<loc0000><loc0512><loc1023><loc0001> tb ; <loc0100><loc0200><loc0300><loc0400>" +
    "".join(f"<seg{j:03d}>" for j in range(0, 128, 8)) + " nodule",
    " leading and trailing spaces ",
    "",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "small.model"
  tk.train(CORPUS, path, vocab_size=400)
  return path


@pytest.fixture(scope="module")
def tok(tok_path):
  return tk.Tokenizer(tok_path)


def _proto(path):
  proto = sp_pb.ModelProto()
  proto.ParseFromString(path.read_bytes())
  return proto


def _write(proto, path):
  path.write_bytes(proto.SerializeToString())
  return path


def test_id_layout(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.base_size == 400
  assert tok.vocab_size == 400 + 1024 + 128
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
  for i in (0, 1, 517, 1023):
    assert tok.loc_id(i) == 400 + i
    assert tok.encode(f"<loc{i:04d}>") == [400 + i]
    assert tok.decode([400 + i]) == f"<loc{i:04d}>"
  for j in (0, 45, 127):
    assert tok.seg_id(j) == 400 + 1024 + j
    assert tok.encode(f"<seg{j:03d}>") == [400 + 1024 + j]
    assert tok.decode([tok.seg_id(j)]) == f"<seg{j:03d}>"
  assert tok.encode("\n") == [tok.sep_id]
  assert tok.id_to_piece(tok.sep_id) == "\n"
  assert tok.encode("a\nb").count(tok.sep_id) == 1


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.encode(text) == ids[1:-1]


def test_loc_strings_are_single_tokens_inside_text(tok):
  ids = tok.encode("x<loc0123><seg045> y")
  assert tok.loc_id(123) in ids and tok.seg_id(45) in ids
  assert ids.index(tok.seg_id(45)) == ids.index(tok.loc_id(123)) + 1


def test_decode_stops_at_eos_and_drops_specials(tok):
  a, b = tok.encode("right lung"), tok.encode("left lung")
  ids = [tok.bos_id] + a + [tok.eos_id] + b + [tok.pad_id] * 3
  assert tok.decode(ids) == "right lung"
  assert tok.decode(ids, stop_at_eos=False) == "right lungleft lung"
  with pytest.raises(tk.TokenizerError, match="outside the vocabulary"):
    tok.decode([5, tok.vocab_size])
  with pytest.raises(tk.TokenizerError, match="outside"):
    tok.loc_id(1024)
  with pytest.raises(tk.TokenizerError, match="takes a str"):
    tok.encode(["a"])


def test_training_is_deterministic(tmp_path, tok_path):
  again = tk.train(CORPUS, tmp_path / "again.model", vocab_size=400)
  assert (tmp_path / "again.model").read_bytes() == tok_path.read_bytes()
  assert again.encode(TEXTS[0]) == tk.Tokenizer(tok_path).encode(TEXTS[0])


def test_official_layout_is_detected_not_appended_twice(tmp_path, tok_path, tok):
  proto = _proto(tok_path)  # The trained file already has loc/seg at the end, like the official one.
  assert len(proto.pieces) == tok.vocab_size
  assert proto.pieces[400].piece == "<loc0000>" and proto.pieces[-1].piece == "<seg127>"
  official_like = tk.Tokenizer(_write(proto, tmp_path / "official_like.model"))
  assert (official_like.base_size, official_like.vocab_size) == (400, tok.vocab_size)
  # A plain base model (what the Gemma tokenizer is) gets them appended in memory.
  del proto.pieces[400:]
  plain = tk.Tokenizer(_write(proto, tmp_path / "plain.model"))
  assert (plain.base_size, plain.vocab_size) == (400, tok.vocab_size)
  for text in TEXTS:
    assert plain.encode(text) == tok.encode(text) == official_like.encode(text)


def test_partial_or_misordered_loc_seg_are_rejected(tmp_path, tok_path):
  proto = _proto(tok_path)
  del proto.pieces[400 + 1024 + 64:]  # Half of the seg pieces missing.
  with pytest.raises(tk.TokenizerError, match="holds 1088 <loc>/<seg> pieces"):
    tk.Tokenizer(_write(proto, tmp_path / "partial.model"))
  proto = _proto(tok_path)
  proto.pieces[400].piece, proto.pieces[401].piece = "<loc0001>", "<loc0000>"
  with pytest.raises(tk.TokenizerError, match="in that order"):
    tk.Tokenizer(_write(proto, tmp_path / "swapped.model"))
  proto = _proto(tok_path)
  extra = list(proto.pieces[400:])
  del proto.pieces[400:]
  proto.pieces.extend(extra[1024:] + extra[:1024])  # seg before loc.
  with pytest.raises(tk.TokenizerError, match="in that order"):
    tk.Tokenizer(_write(proto, tmp_path / "seg_first.model"))


def test_bad_special_ids_and_bad_files_are_rejected(tmp_path, tok_path):
  proto = _proto(tok_path)
  proto.pieces[1].piece, proto.pieces[2].piece = "<s>", "</s>"  # bos 1, eos 2.
  with pytest.raises(tk.TokenizerError, match="special ids"):
    tk.Tokenizer(_write(proto, tmp_path / "swapped_specials.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"\xff\x00not a model at all")
  with pytest.raises(tk.TokenizerError, match="junk.model"):
    tk.Tokenizer(junk)
  with pytest.raises(tk.TokenizerError, match="Cannot read"):
    tk.Tokenizer(tmp_path / "missing.model")


def test_train_errors(tmp_path):
  with pytest.raises(tk.TokenizerError, match="too small"):
    tk.train(CORPUS, tmp_path / "x.model", vocab_size=100)
  with pytest.raises(tk.TokenizerError, match="at least one"):
    tk.train(["", ""], tmp_path / "x.model", vocab_size=400)
  with pytest.raises(tk.TokenizerError, match="vocab_size=5000"):
    tk.train(CORPUS, tmp_path / "x.model", vocab_size=5000)
  assert not (tmp_path / "x.model").exists()


def test_cli_train(tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS), encoding="utf-8")
  out = tmp_path / "cli.model"
  tk.main(["train", "--corpus", str(corpus), "--out", str(out), "--vocab_size", "350"])
  assert "vocab_size=1502" in capsys.readouterr().err
  assert tk.Tokenizer(out).decode(tk.Tokenizer(out).encode(TEXTS[1])) == TEXTS[1]
  assert tk.main(["train", "--corpus", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
  assert "none.txt" in capsys.readouterr().err.split("error: ")[1]


def test_lone_surrogate_is_a_tokenizer_error_naming_the_position(tmp_path, tok):
  with pytest.raises(tk.TokenizerError, match=r"encode\(\): character '\\ud800' at position 3 is a "
                                              r"lone surrogate"):
    tok.encode("abc\ud800d")
  with pytest.raises(tk.TokenizerError, match=r"train\(\): non-empty line 1: character '\\udcff' "
                                              r"at position 0"):
    tk.train(["fine", "\udcff", ""], tmp_path / "x.model", vocab_size=400)
  assert not (tmp_path / "x.model").exists()


def test_decode_of_non_integer_ids_is_a_tokenizer_error(tok):
  with pytest.raises(tk.TokenizerError, match="decode\\(\\) takes integer ids"):
    tok.decode(["x"])


def test_cli_usage_error_is_one_line(capsys):
  assert tk.main(["train", "--corpus", "c.txt"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "--out" in err
