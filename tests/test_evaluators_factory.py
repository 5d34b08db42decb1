"""evaluators/common.from_config: config.evals -> evaluators on input_pipeline.evaluation data."""
import ml_collections
import numpy as np
import pytest

from big_vision_cxr import input_pipeline, seg_codec
from big_vision_cxr.evaluators import common, detection, segmentation
from big_vision_cxr.models import paligemma as pg
from big_vision_cxr.pp import ops_text


@pytest.fixture(scope="module")
def model_and_tokenizer():
  tok = ops_text.default_tokenizer()
  cfg = pg.get_config("tiny")
  cfg.llm.vocab_size = tok.vocab_size
  return pg.Model(**cfg), tok


def _config(tmp_path):
  return ml_collections.ConfigDict(dict(
      input=dict(datasets={"ph": dict(source="phantom", n=24, size=48)}, text_len=48,
                 pp_image="decode|resize(32)|value_range(-1, 1)"),
      evals=dict(
          det=dict(type="detection", task="detection", split="test", batch_size=4, log_steps=5,
                   pred_kw=dict(max_decode_len=24), score_rule="ones", outfile=str(tmp_path / "det.jsonl")),
          seg=dict(type="segmentation", task="segmentation", split="val", pred_kw=dict(max_decode_len=30)))))


def _record_calls(monkeypatch, make_data):
  """input_pipeline.evaluation replaced: [(kwargs, the data it returned)] of each call."""
  calls = []

  def evaluation(config, **kw):
    calls.append((kw, make_data(config, **kw)))
    return calls[-1][1]
  monkeypatch.setattr(input_pipeline, "evaluation", evaluation)
  return calls


def test_from_config_builds_each_evaluator_on_its_data(tmp_path, monkeypatch, model_and_tokenizer):
  model, tok = model_and_tokenizer
  codec = seg_codec.SegCodec.from_npz(seg_codec.DEMO_VQVAE)
  calls = _record_calls(monkeypatch, input_pipeline.evaluation)
  evals = common.from_config(_config(tmp_path), model, tok, codec)
  assert list(evals) == ["det", "seg"]
  (det, det_every), (seg, seg_every) = evals["det"], evals["seg"]
  assert isinstance(det, detection.Evaluator) and isinstance(seg, segmentation.Evaluator)
  assert (det_every, seg_every) == (5, None)  # None: only at the end of training
  assert det.metric_kw == {"score_rule": "ones"} and det.outfile == str(tmp_path / "det.jsonl")
  assert seg.metric_kw == {} and seg.outfile is None and seg.seg_codec is codec
  assert det.predictor.max_decode_len == 24 and seg.predictor.max_decode_len == 30
  assert det.predictor.tokenizer is tok and det.predictor.model is model
  kws = [kw for kw, _ in calls]
  assert [(kw["task"], kw["split"], kw["batch_size"]) for kw in kws] == [("detection", "test", 4),
                                                                         ("segmentation", "val", 8)]
  assert all(kw["seg_codec"] is codec and kw["class_names"] is None for kw in kws)
  # The detection evaluator got the pipeline's batches of test-split detection examples.
  batch, gts = next(iter(calls[0][1]))
  assert np.asarray(batch["image"]).shape == (4, 32, 32, 3)
  assert gts and {g["task"] for g in gts} == {"detection"}


def test_from_config_passes_class_names_and_image_size(tmp_path, monkeypatch, model_and_tokenizer):
  model, tok = model_and_tokenizer
  calls = _record_calls(monkeypatch, lambda config, **kw: iter(()))
  config = _config(tmp_path)
  common.from_config(config, model, tok, None, class_names=("active tb", "latent tb"),
                     image_size=32)
  assert [(kw["class_names"], kw["image_size"]) for kw, _ in calls] == [
      (("active tb", "latent tb"), 32)] * 2
  calls.clear()
  evals = common.from_config(config, model, tok, None)
  assert len(calls) == 2 and all(kw["class_names"] is None for kw, _ in calls)
  assert isinstance(evals["seg"][0].seg_codec, seg_codec.SegCodec)  # without one: the evaluator's default
  config.evals = {}
  assert common.from_config(config, model, tok, None) == {}
