"""Reads a built TFDS `cxr_tb` dataset back into source records (the 'tfds' source).

    recs = tfds_source.read("cxr_tb/phantom", data_dir=None, split=None)
    rec = tfds_source.fetch(recs[0])   # a streamed entry's full record, read from disk

An ArrayRecord build (the builder's default) with its record index in the metadata
(`info.metadata['index']`: per split, columns per record in file order) is
streamed: `read` returns entries without image or objects (`image` None; `meta`
holds the record's `curation.summary` and where it lies), and `fetch` reads one
record by index from the split's ArrayRecord files (opened once per process), parses
its tf.train.Example itself (`_Parsed`, the same values as tfds' decoding) and decodes
its PNG (`decode_image`). Other builds (TFRecord, no index) or `stream=False` are read
whole into memory through tfds.

The features are those `tfds_builders/cxr_tb.py` writes (docs/DATA.md, section 5):
ClassLabels back to names, '' back to None, a 1x1 mask where `masks_known` is
False back to no masks, `findings` JSON back to a dict. tensorflow_datasets is
imported only when a dataset is read. A dataset that is not built and an
unknown split are a `TfdsSourceError`.
"""
import dataclasses
import io
import json
import pathlib
import threading

import numpy as np
from PIL import Image

from big_vision_cxr import errors
from big_vision_cxr.data import images, records
from big_vision_cxr.registry import DATA_SOURCES


class TfdsSourceError(errors.Error):
  """A built dataset that cannot be read as asked; the message names it."""


def _str(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def example_to_record(ex, split=None):
  """A decoded TFDS example (numpy) -> SourceRecord (no masks if they were left undecoded)."""
  objs = ex["objects"]
  n = len(objs["label"])
  opt = lambda values: [(_str(v) or None) for v in values]
  decoded = n == 0 or not isinstance(objs["mask"][0], bytes)
  mask = np.stack([m[..., 0] for m in objs["mask"]]).astype(np.uint8) if ex["masks_known"] and n and decoded else (
      np.zeros((0, *ex["image"].shape[:2]), np.uint8) if ex["masks_known"] and decoded else None)
  return records.validate(records.SourceRecord(
      image_id=_str(ex["image_id"]), patient_id=_str(ex["patient_id"]), source=_str(ex["source"]),
      image=np.asarray(ex["image"][..., 0], np.uint8), label=records.LABELS[int(ex["label"])],
      objects=records.Objects(
          bbox=np.asarray(objs["bbox"], np.float32).reshape(-1, 4),
          label=[records.CLASS_NAMES[int(l)] for l in objs["label"]], mask=mask,
          lung=opt(objs["lung"]), zone=opt(objs["zone"]), kind=opt(objs["kind"])),
      report=_str(ex["report"]) or None,
      qa=[dict(question=_str(q), answer=_str(a), type=_str(t))
          for q, a, t in zip(ex["qa"]["question"], ex["qa"]["answer"], ex["qa"]["type"])],
      split=split, meta=dict(findings=json.loads(_str(ex["findings"])))))


_SOURCES = {}  # (dataset dir, split, masks) -> _Parsed, per process
_SOURCES_LOCK = threading.Lock()  # grain's read threads open a split once


def _stubs(data_dir, split, cols):
  """Index entries of one split (the builder's columns) as records without pixels."""
  keys = ("n_objects", "n_vqa", "lesions_known", "masks_known", "classes")
  return [records.SourceRecord(
      image_id=cols["image_id"][i], patient_id=cols["patient_id"][i], source=cols["source"][i],
      image=None, label=records.LABELS[cols["label"][i]], objects=records.Objects.empty(),
      split=split, meta=dict(summary={k: cols[k][i] for k in keys}, stream=(data_dir, split, i)))
      for i in range(len(cols["image_id"]))]


def decode_image(png):
  """A stored PNG -> uint8 [H, W, 1], what tfds decodes for `cxr_tb`'s image feature
  (PIL), less its copy of 8-bit grey; other modes go through tfds."""
  with Image.open(io.BytesIO(png)) as im:
    if im.mode == "L":
      return np.asarray(im)[..., None]
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.features.Image(shape=(None, None, 1), encoding_format="png").decode_example_np(png)


class _Parsed:
  """One split of an ArrayRecord build, record i parsed straight from its tf.train.Example
  into what `example_to_record` reads of cxr_tb's features (as tfds' numpy decoding
  gives them), the image left as PNG bytes and the masks decoded only when asked
  (`masks` and known). tfds' generic per-feature decoding cost as much as reading the
  record and more than curating and tokenising it."""

  def __init__(self, data_dir, split, masks):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
    self._raw = tfds.builder_from_directory(data_dir).as_data_source(split).data_source
    self._example, self._masks = tf_example_pb2.Example, masks

  def __len__(self):
    return len(self._raw)

  def __getitem__(self, index):
    features = self._example.FromString(self._raw[index]).features.feature

    def values(key):
      kind = features[key].WhichOneof("kind")
      return list(getattr(features[key], kind).value) if kind else []

    masks_known = bool(values("masks_known")[0])
    mask = values("objects/mask")
    if self._masks and masks_known:
      mask = [decode_image(m) for m in mask]
    one = lambda key: values(key)[0]
    return {
        "image": one("image"), "image_id": one("image_id"), "patient_id": one("patient_id"),
        "source": one("source"), "label": one("label"), "masks_known": masks_known,
        "objects": {"bbox": np.asarray(values("objects/bbox"), np.float32).reshape(-1, 4),
                    "label": values("objects/label"), "mask": mask,
                    **{k: values(f"objects/{k}") for k in ("lung", "zone", "kind")}},
        "report": one("report"), "findings": one("findings"),
        "qa": {k: values(f"qa/{k}") for k in ("question", "answer", "type")}}


def _source(data_dir, split, masks):
  """A split's records by index (`_Parsed`: the image as PNG bytes, which `fetch`
  decodes), opened once per process; masks=False leaves the masks undecoded (dropped by
  `example_to_record`: for tasks that do not use them)."""
  key = (data_dir, split, masks)
  if key not in _SOURCES:
    with _SOURCES_LOCK:
      if key not in _SOURCES:
        _SOURCES[key] = _Parsed(data_dir, split, masks)
  return _SOURCES[key]


def fetch(stub, masks=True):
  """The full record of a streamed entry (its source, patient id and split kept); without
  its object masks unless `masks`."""
  data_dir, split, index = stub.meta["stream"]
  try:
    ex = _source(data_dir, split, masks)[index]
    rec = example_to_record({**ex, "image": decode_image(ex["image"])}, split=split)
  except Exception as e:  # Any failure reading one record is that record's error.
    raise TfdsSourceError(f"{data_dir} split {split} record {index} ({stub.image_id!r}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  if rec.image_id != stub.image_id:
    raise TfdsSourceError(f"{data_dir} split {split} record {index} is {rec.image_id!r}, its "
                          f"index says {stub.image_id!r}: rebuild the dataset")
  return dataclasses.replace(rec, source=stub.source, patient_id=stub.patient_id, split=stub.split)


def read(name, data_dir=None, split=None, stream=True):
  """Every example of a built `cxr_tb/<config>` (or a dataset directory) as records;
  each keeps the split it was stored under. Streamed when possible (module doc)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(name)
  not_built = (f"tfds dataset {name!r} (data_dir {data_dir}) is not built (build it with "
               f"python -m tfds_builders.build)")
  try:
    builder = (tfds.builder_from_directory(str(path)) if path.is_dir()
               else tfds.builder(name, data_dir=data_dir))
  except (tfds.core.registered.DatasetNotFoundError, OSError) as e:
    raise TfdsSourceError(f"{not_built}: {type(e).__name__}") from e
  if not builder.info.splits:
    raise TfdsSourceError(f"{not_built}: it has no splits")
  if split and split not in builder.info.splits:
    raise TfdsSourceError(f"tfds dataset {name!r} has no split {split!r}; it has "
                          f"{sorted(builder.info.splits)}")
  index = builder.info.metadata.get("index") if builder.info.metadata else None
  streamable = stream and index and builder.info.file_format.value == "array_record"
  out = []
  for s in ([split] if split else list(builder.info.splits)):
    if streamable:
      out += _stubs(str(builder.data_dir), s, index[s])
      continue
    if builder.info.file_format.value == "array_record":
      source = builder.as_data_source(s)
      examples = (source[i] for i in range(len(source)))
    else:
      examples = tfds.as_numpy(builder.as_dataset(split=s, shuffle_files=False))
    out += [example_to_record(ex, split=s) for ex in examples]
  return out


@DATA_SOURCES.register("tfds")
def from_config(name, cfg):
  """(records, skips) of dict(source='tfds', name='cxr_tb/<config>' or a dataset folder,
  data_dir=None, tfds_split=None (every split), stream=True)."""
  return (read(cfg["name"], data_dir=cfg.get("data_dir"), split=cfg.get("tfds_split"),
               stream=cfg.get("stream", True)), images.Skips(name))
