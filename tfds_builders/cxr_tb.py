"""TFDS dataset `cxr_tb`: chest radiographs with TB labels, lesions, reports and QA.

Build with the Python API, or this module's thin CLI around it:
    python -m tfds_builders.build --config tbx11k --manual_dir /data/tbx11k --data_dir ~/tensorflow_datasets
or with the TFDS CLI (it imports apache_beam at start-up in tfds 4.9.x,
tensorflow/datasets#5463, so `pip install apache-beam` first):
    tfds build cxr_tb --imports tfds_builders.cxr_tb --config nih_cxr14 --manual_dir /data/nih

Files are ArrayRecord (`file_format='array_record'`, random access through
`tfds.data_source`), examples in generation order (no shuffling), and the
metadata holds what the input pipeline needs up front (docs/DATA.md, section 5):
`index` (per split, per record in file order: image_id, patient_id, source, label
and `curation.summary`), `task_counts` (per split and task, every option at its
default) and `class_names`.

Configs: `phantom` (1000 synthetic images, 256 px), `phantom_small` (48 at 64 px,
for tests; phantoms are generated one at a time while writing), `tbx11k` (manual_dir holds the release's `TBX11K/` folder),
`nih_cxr14` (manual_dir holds the NIH `manifest.csv` + images), `manifest`
(manual_dir holds `manifest.csv` or `manifest.jsonl` in the generic format of
`data/manifest.py`). Splits train/val/test are by patient (`data/splits.py`,
seed 0, 80/10/10) and honour a source's own lists; empty splits are omitted.

Features: image (PNG, 1 channel), image_id, patient_id, source, label
(ClassLabel tb/normal/sick_non_tb), objects (bbox normalised y_min, x_min,
y_max, x_max; label ClassLabel; mask PNG 0/1 per object, 1x1 when
`masks_known` is False; lung, zone, kind: '' when unknown), masks_known,
report ('' when none), qa (question, answer, type), findings (JSON).
Skipped inputs (corrupt image, DICOM without pixels, box outside the image,
missing file) are logged with the file name and recorded with their count in
the dataset metadata (`info.metadata['skipped']`): never a crash mid-build,
never a silent loss. What would leave nothing to build (no usable row or
image, a TBX11K split with none of its listed images) and two examples of one
key are a `BuildError` or the reader's error, raised before any example is
written. `big_vision_cxr.data.tfds_source` reads a built dataset
back into source records.
"""
import dataclasses
import json
import logging
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from big_vision_cxr import errors
from big_vision_cxr.data import curation, images, manifest, phantom, prompts, records, splits
from big_vision_cxr.data import tbx11k


class BuildError(errors.Error):
  """The inputs cannot give a dataset; the message says why."""


@dataclasses.dataclass
class CxrTbConfig(tfds.core.BuilderConfig):
  source: str = "phantom"
  n: int = 0
  size: int = 256
  difficulty: float = 0.3
  split_seed: int = 0
  distinct_images: int = 0  # phantom, for throughput benchmarks: record i shows phantom i % this


class CxrTb(tfds.core.GeneratorBasedBuilder):
  """Chest radiographs with TB labels, lesion boxes/masks, reports and QA."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release: phantom, TBX11K, NIH normals, generic manifest.",
                   "1.1.0": "ArrayRecord in generation order; record index in the metadata."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  tbx11k: point --manual_dir at the folder holding TBX11K/ (imgs/, annotations/xml/, lists/).
  nih_cxr14: the folder holding manifest.csv and images/ (see data/manifest.py NIH_CXR14).
  manifest: the folder holding manifest.csv or manifest.jsonl (format in docs/DATA.md).
  """
  BUILDER_CONFIGS = [
      CxrTbConfig(name="phantom", source="phantom", n=1000, size=256,
                  description="Synthetic phantom radiographs with exact lesion masks."),
      CxrTbConfig(name="phantom_small", source="phantom", n=48, size=64,
                  description="A tiny phantom for tests."),
      CxrTbConfig(name="tbx11k", source="tbx11k", description="TBX11K release (manual_dir)."),
      CxrTbConfig(name="nih_cxr14", source="nih_cxr14", description="NIH 'No Finding' normals."),
      CxrTbConfig(name="manifest", source="manifest", description="A generic CSV/JSONL manifest."),
  ]

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self):
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "image_id": text, "patient_id": text, "source": text,
            "label": tfds.features.ClassLabel(names=records.LABELS),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=records.CLASS_NAMES),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "lung": text, "zone": text, "kind": text,
            }),
            "masks_known": tfds.features.Scalar(dtype=np.bool_),
            "report": text,
            "qa": tfds.features.Sequence({"question": text, "answer": text, "type": text}),
            "findings": text,
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # file order = generation order = the metadata's index
        homepage="https://mmcheng.net/tb/",
    )

  def _read(self, dl_manager):
    cfg = self.builder_config
    skips = images.Skips(f"cxr_tb/{cfg.name}")
    if cfg.source == "phantom":
      return phantom.dataset(cfg.n, size=cfg.size, difficulty=cfg.difficulty), skips
    root = pathlib.Path(dl_manager.manual_dir)
    if cfg.source == "tbx11k":
      return tbx11k.read(root, skips=skips)
    if cfg.source == "nih_cxr14":
      return manifest.read(root / "manifest.csv", skips=skips, **manifest.NIH_CXR14)
    for name in ("manifest.csv", "manifest.jsonl", "manifest.tsv"):
      if (root / name).is_file():
        return manifest.read(root / name, skips=skips)
    raise manifest.ManifestError(f"{root}: no manifest.csv, manifest.jsonl or manifest.tsv")

  def _check_unique_keys(self, recs):
    seen = {}
    for rec in recs:
      key = example_key(rec)
      origin = ":".join(str(rec.meta[k]) for k in ("path", "line") if k in rec.meta) or rec.image_id
      if key in seen:
        raise BuildError(f"cxr_tb/{self.builder_config.name}: two examples of key {key!r}: "
                         f"{seen[key]} and {origin}")
      seen[key] = origin

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    self.info.metadata.update(index={}, task_counts={}, class_names=[])
    if cfg.source == "phantom":  # one at a time: a scale build never holds its images
      self.info.metadata["skipped"] = images.Skips(f"cxr_tb/{cfg.name}").summary()
      self.info.metadata["records"] = cfg.n
      by_split, self._pictures = {s: [] for s in splits.SPLITS}, {}
      for i in range(cfg.n):
        by_split[splits.assign(phantom.patient_of(i)[0], seed=cfg.split_seed)].append(i)
      return {s: self._generate_examples(s, map(self._phantom, idx))
              for s, idx in by_split.items() if idx}
    recs, skips = self._read(dl_manager)
    if not recs:
      raise BuildError(f"cxr_tb/{self.builder_config.name}: no records to build")
    self._check_unique_keys(recs)  # TFDS would find it only after writing every example
    splits.apply(recs, seed=self.builder_config.split_seed)
    self.info.metadata["skipped"] = skips.summary()
    self.info.metadata["records"] = len(recs)
    if len(skips):
      logging.warning("cxr_tb/%s: %d inputs skipped (see info.metadata['skipped'])",
                      self.builder_config.name, len(skips))
    by_split = {s: [r for r in recs if r.split == s] for s in splits.SPLITS}
    return {s: self._generate_examples(s, rs) for s, rs in by_split.items() if rs}

  def _phantom(self, i):
    """Phantom record i (split by patient like the other sources), or with
    `distinct_images` K its image id and patient on phantom i % K's picture."""
    cfg = self.builder_config
    if not cfg.distinct_images:
      rec = phantom.generate(i, size=cfg.size, difficulty=cfg.difficulty)
    else:
      k = i % cfg.distinct_images
      if k not in self._pictures:
        self._pictures[k] = phantom.generate(k, size=cfg.size, difficulty=cfg.difficulty)
      rec = dataclasses.replace(self._pictures[k], image_id=f"phantom-s0-{i:07d}",
                                patient_id=phantom.patient_of(i)[0],
                                meta={**self._pictures[k].meta, "picture": k})
    rec.split = splits.assign(rec.patient_id, seed=cfg.split_seed)
    return rec

  def _generate_examples(self, split, recs):
    """Writes `recs` in order and their index into the metadata (module doc)."""
    cols = {k: [] for k in INDEX_KEYS}
    encoded = {}  # distinct_images: the encoded example of each picture
    for rec in recs:
      summary = curation.summary(rec)
      for k, v in dict(image_id=rec.image_id, patient_id=rec.patient_id, source=rec.source,
                       label=records.LABELS.index(rec.label), **summary).items():
        cols[k].append(v)
      ex = record_to_example(rec)
      if "picture" in rec.meta:  # PNG-encode each distinct picture (and its masks) once
        if rec.meta["picture"] not in encoded:
          png = self.info.features["image"].encode_example
          encoded[rec.meta["picture"]] = (png(ex["image"]), [png(m) for m in ex["objects"]["mask"]])
        ex["image"], ex["objects"]["mask"] = encoded[rec.meta["picture"]]
      yield example_key(rec), ex
    md = self.info.metadata
    md["index"][split] = cols
    md["task_counts"][split] = dict(zip(prompts.TASKS, np.sum(
        [curation.task_counts(s, prompts.TASKS) for s in _rows(cols)], axis=0).tolist()))
    md["class_names"] = sorted(set(md["class_names"]).union(
        *[curation.classes(s) for s in _rows(cols)]))


INDEX_KEYS = ("image_id", "patient_id", "source", "label", "n_objects", "n_vqa", "lesions_known",
              "masks_known", "classes")


def _rows(cols):
  keys = ("n_objects", "n_vqa", "lesions_known", "masks_known", "classes")
  return [dict(zip(keys, v)) for v in zip(*(cols[k] for k in keys))]


def example_key(rec):
  return f"{rec.source}/{rec.image_id}"


def record_to_example(rec):
  """SourceRecord -> the TFDS feature dict."""
  objs = rec.objects
  n = len(objs)
  known = objs.mask is not None
  blank = np.zeros((1, 1, 1), np.uint8)
  attr = lambda values: [v or "" for v in (values or [None] * n)]
  return {
      "image": rec.image[..., None], "image_id": rec.image_id, "patient_id": rec.patient_id,
      "source": rec.source, "label": rec.label,
      "objects": {
          "bbox": np.asarray(objs.bbox, np.float32).reshape(-1, 4),
          "label": list(objs.label),
          "mask": [objs.mask[i][..., None] if known else blank for i in range(n)],
          "lung": attr(objs.lung), "zone": attr(objs.zone), "kind": attr(objs.kind)},
      "masks_known": known, "report": rec.report or "",
      "qa": [dict(q) for q in rec.qa],
      "findings": json.dumps(rec.meta.get("findings", {}), sort_keys=True),
  }
