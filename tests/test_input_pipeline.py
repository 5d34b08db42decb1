"""Input pipeline: mixture rates, weights, exact resume, host sharding, evaluation order."""
import collections
import csv
import json

import numpy as np
import pytest
from scipy import stats

from big_vision_cxr import input_pipeline as ip
from big_vision_cxr.data import datasets, prompts
from big_vision_cxr.pp import builder, ops_image, ops_text

TASKS = ("diagnosis", "vqa", "report", "detection")


@pytest.fixture(scope="module")
def tok():
  return ops_text.default_tokenizer()


def config(**kw):
  base = dict(datasets={"ph": dict(source="phantom", n=120, size=48)}, tasks=TASKS,
              pp_image="decode|resize(32)|value_range(-1, 1)", text_len=40)
  return {**base, **kw}


def test_weight_rules():
  sizes = {"a": 10, "b": 30, "c": 0}
  np.testing.assert_allclose(list(ip.mixture_weights(sizes, "inverse_size").values()), [0.75, 0.25])
  np.testing.assert_allclose(list(ip.mixture_weights(sizes, "proportional").values()), [0.25, 0.75])
  np.testing.assert_allclose(list(ip.mixture_weights(sizes, "uniform").values()), [0.5, 0.5])
  np.testing.assert_allclose(list(ip.mixture_weights(sizes, {"a": 3, "b": 1, "c": 5}).values()), [0.75, 0.25])
  with pytest.raises(ip.InputError, match=r"no weight for units \['b'\]"):
    ip.mixture_weights(sizes, {"a": 1})
  with pytest.raises(ip.InputError, match="weights"):
    ip.mixture_weights(sizes, "bogus")


@pytest.mark.parametrize("weights", ["inverse_size", {"diagnosis": 1, "vqa": 2, "report": 3, "detection": 4}])
def test_tasks_drawn_at_their_rates(tok, weights):
  it = ip.training(config(weights=weights), batch_size=4, seed=1, tokenizer=tok)
  sizes = {u: len(v) for u, v in it.units.items()}
  if weights == "inverse_size":
    inv = {u: 1 / n for u, n in sizes.items()}
    want = {u: inv[u] / sum(inv.values()) for u in sizes}
  else:
    want = {u: w / 10 for u, w in weights.items()}
  np.testing.assert_allclose([it.probs[u] for u in sizes], [want[u] for u in sizes])
  n = 20000
  counts = collections.Counter(it.draw()[1] for _ in range(n))
  observed = [counts[u] for u in it.names]
  expected = [want[u] * n for u in it.names]
  assert stats.chisquare(observed, expected).pvalue > 1e-4
  for u in it.names:  # and each within 5 binomial standard deviations
    sd = np.sqrt(n * want[u] * (1 - want[u]))
    assert abs(counts[u] - want[u] * n) < 5 * sd


def test_each_epoch_of_a_unit_is_a_permutation(tok):
  it = ip.training(config(weights="uniform"), batch_size=4, seed=2, tokenizer=tok)
  unit, n = "report", len(it.units["report"])
  seen = []
  while len(seen) < 2 * n:
    _, u, ex = it.draw()
    if u == unit:
      seen.append(ex.image_id)
  first, second = seen[:n], seen[n:]
  assert sorted(first) == sorted(second) == sorted(it.examples.records[r].image_id for r in it.units[unit].rec)
  assert first != second  # a new permutation each epoch


def test_restored_iterator_continues_exactly(tok):
  a = ip.training(config(), batch_size=6, seed=3, tokenizer=tok)
  for _ in range(5):
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  want = [next(a) for _ in range(4)]
  b = ip.training(config(), batch_size=6, seed=3, tokenizer=tok)
  b.set_state(state)
  got = [next(b) for _ in range(4)]
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ip.InputError, match="units"):
    ip.training(config(tasks=("diagnosis",)), batch_size=2, seed=3, tokenizer=tok).set_state(state)


def test_batches_follow_the_contract(tok):
  batch = next(ip.training(config(), batch_size=8, seed=0, tokenizer=tok))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  for k in ("text", "mask_ar", "mask_loss"):
    assert batch[k].shape == (8, 41) and batch[k].dtype == np.int32
  assert batch["task_id"].dtype == np.int32 and set(batch["task_id"]) <= set(range(len(prompts.TASKS)))
  assert np.all(batch["text"][:, 0] == tok.bos_id) and np.all(batch["mask_loss"].sum(1) >= 1)
  for text, tid in zip(batch["text"], batch["task_id"]):
    prefix = tok.decode(text).split("\n")[0]
    task = prompts.TASKS[tid]
    assert {"diagnosis": prompts.DIAGNOSIS_PREFIX, "report": prompts.REPORT_PREFIX}.get(task, prefix) == prefix
    assert task != "detection" or prefix.startswith("detect ")


def test_hosts_split_the_global_sequence(tok):
  single = ip.training(config(), batch_size=8, seed=5, tokenizer=tok)
  hosts = [ip.training(config(), batch_size=4, seed=5, tokenizer=tok, process_index=p, process_count=2)
           for p in range(2)]
  ids = lambda exs: [(e.image_id, e.task, e.prefix) for e in exs]
  for _ in range(3):
    whole = ids(single.next_examples())
    parts = [ids(h.next_examples()) for h in hosts]
    assert whole[0::2] == parts[0] and whole[1::2] == parts[1]
  assert hosts[0].get_state() == hosts[1].get_state() == single.get_state()


def test_evaluation_covers_each_example_once():
  cfg = config()
  units = ip.curated_units(cfg, split="val", tasks=("vqa",))
  batches = list(ip.evaluation(cfg, task="vqa", split="val", batch_size=16))
  gts = [g for _, gt in batches for g in gt]
  assert len(gts) == len(units["vqa"]) and sum(b["valid"].sum() for b, _ in batches) == len(gts)
  assert [(g["image_id"], g["prefix"]) for g in gts] == [(e.image_id, e.prefix) for e in units["vqa"]]
  assert all(g["question_type"] in ("closed", "open") for g in gts)
  b, _ = batches[0]
  assert set(b) == {"image", "valid"} and b["image"].shape == (16, 32, 32, 3)
  model_input = ops_image.model_input_fn(cfg["pp_image"], 32)  # what inference does
  for image, ex in zip(b["image"], units["vqa"]):
    assert np.ascontiguousarray(image).tobytes() == model_input(ex.image).tobytes()


def test_object_tasks_positives_only_filters_training_not_evaluation(tok):
  cfg = config(object_tasks_positives_only=True, weights="uniform")
  full = ip.curated_units(config(), split="train")
  n_normal = sum(len(e.objects.bbox) == 0 for e in full["detection"])
  assert 0 < n_normal < len(full["detection"])
  it = ip.training(cfg, batch_size=64, seed=0, tokenizer=tok)
  assert len(it.units["detection"]) == len(full["detection"]) - n_normal
  det = it.units["detection"]
  assert all(len(it.examples.example(r, "detection", k).objects.bbox) for r, k in zip(det.rec, det.k))
  assert [len(it.units[t]) for t in ("diagnosis", "vqa", "report")] == [
      len(full[t]) for t in ("diagnosis", "vqa", "report")]
  gts = [g for _, gt in ip.evaluation(cfg, task="detection", split="train", batch_size=64) for g in gt]
  assert len(gts) == len(full["detection"])  # evaluation keeps the normals


def test_config_errors(tok):
  with pytest.raises(datasets.DatasetError, match="dataset 'x': Unknown data source 'nope'; known: "
                                                  "manifest, phantom, tbx11k, tfds, voc"):
    ip.training(config(datasets={"x": dict(source="nope")}), batch_size=2, seed=0, tokenizer=tok)
  with pytest.raises(builder.PPError, match=r"gives images of shape \(32, 32, 1\).*\(64, 64, 3\)"):
    next(ip.training(config(), batch_size=2, seed=0, tokenizer=tok, image_size=64))


def test_data_sources_registry_and_no_tfds_builders_import():
  import pathlib
  import re
  import subprocess
  import sys
  code = ("import sys; from big_vision_cxr import input_pipeline; "
          "from big_vision_cxr.registry import DATA_SOURCES; print(DATA_SOURCES.names()); "
          "print(sorted(m for m in ('tfds_builders', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.split("\n")[:2] == ["['manifest', 'phantom', 'tbx11k', 'tfds', 'voc']", "[]"]
  package = pathlib.Path(ip.__file__).parent
  assert not [p for p in package.rglob("*.py")
              if re.search(r"^\s*(from|import) tfds_builders", p.read_text(), re.M)]


def test_class_names_from_the_data_config_or_argument(tok):
  assert ip.class_names(config()) == ("active tb", "latent tb")
  assert ip.class_names(config(class_names=["uncertain tb", "active tb"])) == ("active tb", "uncertain tb")
  names = ("uncertain tb", "latent tb", "active tb")
  gts = [g for _, gt in ip.evaluation(config(), task="detection", split="val", batch_size=8,
                                      class_names=names) for g in gt]
  assert {g["prefix"] for g in gts} == {"detect active tb ; latent tb ; uncertain tb"}
  it = ip.training(config(tasks=("detection",)), batch_size=2, seed=0, tokenizer=tok, class_names=names)
  det = it.units["detection"]
  assert {it.examples.example(r, "detection", k).prefix for r, k in zip(det.rec, det.k)} == {"detect active tb ; latent tb ; uncertain tb"}


def test_seg_codec_none_is_the_demo_vqvae(monkeypatch):
  from big_vision_cxr import seg_codec
  asked = []
  monkeypatch.setattr(seg_codec, "from_config", lambda cfg: asked.append(cfg) or _random_codec())
  cfg = config(tasks=("segmentation",), text_len=112, seg_codec=None)
  assert next(ip.evaluation(cfg, task="segmentation", split="val", batch_size=2), None) is not None
  assert asked == [None] and seg_codec.npz_path(None) == seg_codec.DEMO_VQVAE


def test_real_tbx11k_and_nih_mix(tok, tbx11k_dir, nih_dir, tmp_path):
  rows = list(csv.DictReader(open(nih_dir / "manifest.csv")))[:6]
  small = tmp_path / "nih.csv"
  with open(small, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=rows[0].keys())
    w.writeheader()
    w.writerows(rows)
  cfg = config(datasets={
      "tbx11k": dict(source="tbx11k", path=str(tbx11k_dir), splits=("val",)),
      "nih": dict(source="manifest", preset="nih_cxr14", path=str(small), root=str(nih_dir))},
      split_fractions=(1.0, 0.0, 0.0), mix_by="dataset_task")
  units = ip.curated_units(cfg, split="val")
  assert {"tbx11k/detection", "tbx11k/diagnosis"} <= set(units)
  assert len(units["tbx11k/diagnosis"]) == 100  # the official val list is honoured
  nih = ip.curated_units(cfg, split="train")
  assert len(nih["nih/diagnosis"]) == 6 and all(e.suffix == "normal" for e in nih["nih/diagnosis"])
  det = units["tbx11k/detection"][0]
  assert det.prefix == "detect active tb ; latent tb" and det.suffix.count("<loc") % 4 == 0


def test_split_map_and_cached_records_stay_untouched(tok):
  cfg = config(datasets={"ph": dict(source="phantom", n=40, size=32, split_map={"train": None})})
  recs, _ = ip.load_records("ph", cfg["datasets"]["ph"])
  assert all(r.split is None for r in recs)
  ip.curated_units(cfg, split="train", tasks=("diagnosis",))
  assert all(r.split is None for r in recs)  # curation works on copies
  a = ip.curated_units({**cfg, "split_seed": 1}, split="val", tasks=("diagnosis",))
  b = ip.curated_units({**cfg, "split_seed": 2}, split="val", tasks=("diagnosis",))
  assert [e.image_id for e in a["diagnosis"]] != [e.image_id for e in b["diagnosis"]]


def test_truncation_is_counted_and_logged(tok, caplog):
  it = ip.training(config(text_len=16, tasks=("report", "diagnosis")), batch_size=16, seed=0, tokenizer=tok)
  with caplog.at_level("WARNING"):
    batch = next(it)
  reports = batch["task_id"] == prompts.TASKS.index("report")
  cut = reports & ~np.isin(batch["text"][:, -1], [tok.pad_id, tok.eos_id])
  assert reports.any() and it.truncated["report"] == cut.sum() >= 1  # per example drawn
  assert it.truncated["diagnosis"] == 0
  assert "text_len=16 truncates report examples" in caplog.text
  assert cut.any() and np.all(batch["mask_loss"][cut, -1] == 1)  # cut plainly, EOS lost


def _random_codec():
  import jax
  from big_vision_cxr import seg_codec
  from big_vision_cxr.models import vqvae
  model = vqvae.Model(vqvae.Config())  # random weights from the shapes: no init compile
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 64, 64), np.float32))["params"]
  rng = np.random.default_rng(0)
  return seg_codec.SegCodec(model, jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) * 0.1).astype(s.dtype), shapes))


def test_segmentation_through_the_vqvae_codec(tok):
  from big_vision_cxr import loc_codec
  codec = _random_codec()
  cfg = config(tasks=("segmentation",), text_len=112)
  units = ip.curated_units(cfg, split="train", seg_codec=codec)
  exs = units["segmentation"]
  with_objects = [e for e in exs if len(e.objects)]
  assert with_objects and any(e.suffix == "" for e in exs)
  for e in with_objects[:10]:
    parsed = loc_codec.parse_objects(e.suffix, require_seg=True)
    assert parsed.n_invalid == 0 and len(parsed.objects) == len(e.objects)
    np.testing.assert_array_equal(np.stack([o.seg_ids for o in parsed.objects]),
                                  codec.encode(e.objects.mask, e.objects.bbox))
  batch = next(ip.training(cfg, batch_size=4, seed=0, tokenizer=tok, seg_codec=codec))
  assert set(batch["task_id"]) == {prompts.TASKS.index("segmentation")}


def test_evaluation_hosts_get_equal_batch_counts():
  cfg = config()
  whole = [g for _, gts in ip.evaluation(cfg, task="diagnosis", split="val", batch_size=4)
           for g in gts]
  hosts = [list(ip.evaluation(cfg, task="diagnosis", split="val", batch_size=4,
                              process_index=p, process_count=3)) for p in range(3)]
  assert len({len(h) for h in hosts}) == 1  # same number of batches on every host
  ids = sorted(g["image_id"] for h in hosts for _, gts in h for g in gts)
  assert ids == sorted(g["image_id"] for g in whole) and len(whole) % 3 != 0
  for h in hosts:
    for batch, gts in h:
      assert batch["valid"].sum() == len(gts) and batch["image"].shape[0] == 4


def test_every_source_type_names_its_records_after_the_dataset(tmp_path):
  from test_data_readers import fake_tbx11k  # pylint: disable=import-outside-toplevel
  from test_data_voc import CLASS_MAP, voc_tree  # pylint: disable=import-outside-toplevel
  from test_patients import manifest  # pylint: disable=import-outside-toplevel
  for d in ("t", "v"):
    (tmp_path / d).mkdir()
  cfgs = {"ph": dict(source="phantom", n=4, size=32),
          "tb": dict(source="tbx11k", path=str(fake_tbx11k(tmp_path / "t"))),
          "hosp": manifest(tmp_path / "m", ["p0", "p1"]),
          "nih": dict(manifest(tmp_path / "n", ["p0"]), preset="nih_cxr14",
                      columns={"label": "label"}),
          "v": dict(source="voc", path=str(voc_tree(tmp_path / "v")), class_map=CLASS_MAP,
                    unknown_classes="skip"),
          "renamed": dict(source="phantom", n=4, size=32, seed=3, source_name="synthetic",
                          patient_id_prefix="x:")}
  for name, cfg in cfgs.items():
    recs, _ = ip.load_records(name, cfg)
    assert {r.source for r in recs} == {cfg.get("source_name", name)}, name
  assert all(r.patient_id.startswith("x:phantom-s3-") for r in ip.load_records("renamed", cfgs["renamed"])[0])
  with pytest.raises(datasets.DatasetError, match="dataset 'a': source_name 'x/y' must be a non-empty "
                                                  "string without '/'"):
    ip.load_records("a", dict(cfgs["ph"], source_name="x/y"))


def test_two_manifest_datasets_keep_their_names_in_per_source_metrics(tmp_path):
  from big_vision_cxr.registry import EVALUATORS  # pylint: disable=import-outside-toplevel
  from test_patients import manifest  # pylint: disable=import-outside-toplevel
  two = {"hosp_a": manifest(tmp_path / "a", ["a0", "a1", "a2"], split="test"),
         "hosp_b": manifest(tmp_path / "b", ["b0", "b1"], split="test")}
  gts = [g for _, gt in ip.evaluation(config(datasets=two), task="diagnosis", split="test",
                                      batch_size=4) for g in gt]
  assert collections.Counter(g["source"] for g in gts) == {"hosp_a": 3, "hosp_b": 2}
  metrics = EVALUATORS.get("diagnosis").compute_metrics([dict(g, prediction=g["suffix"]) for g in gts])
  assert {k.split("/")[1] for k in metrics if k.startswith("by_source/")} == {"hosp_a", "hosp_b"}
  assert metrics["by_source/hosp_a/accuracy"] == metrics["by_source/hosp_b/accuracy"] == 1.0
  pooled = {n: dict(d, source_name="hospitals") for n, d in two.items()}
  with pytest.raises(datasets.DatasetError, match=r"image id 'im0' of source 'hospitals' is given "
                                                  r"twice \(datasets 'hosp_a' and 'hosp_b'\)"):
    ip.curated_units(config(datasets=pooled), split="test")
  pooled["hosp_b"] = dict(manifest(tmp_path / "b2", ["b0", "b1"], split="test", stem="b"),
                          source_name="hospitals")
  units = ip.curated_units(config(datasets=pooled, tasks=("diagnosis",)), split="test")
  assert {e.source for e in units["diagnosis"]} == {"hospitals"} and len(units["diagnosis"]) == 5
