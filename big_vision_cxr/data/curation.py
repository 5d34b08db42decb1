"""Source records -> the five tasks' examples, one code path for every source.

Per record: one diagnosis example; one VQA example per question whose answer is
known (see `vqa_pairs`) plus the record's own QA; one report example (the
record's report, else a template from the structured findings); one detection
and one segmentation example when the record's lesions are known (a 'tb' record
without objects has unknown lesions and gets neither). Segmentation needs
masks (or `seg_from_boxes=True`, which uses box-shaped masks: weak targets) and
a segmentation codec (`seg_codec.SegCodec`: `encode(masks [n, H, W], boxes [n, 4])
-> [n, 16]` ints).
Objects are ordered by (y_min, x_min). Every example keeps the ground truth the
evaluators need.
"""
import collections
import dataclasses

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import loc_codec
from big_vision_cxr.data import prompts, records


class CurationError(errors.Error):
  """A record cannot be curated as asked; the message names the image."""


@dataclasses.dataclass
class Example:
  """One (image, prefix, suffix) training/eval example and its ground truth."""
  image_id: str
  patient_id: str
  source: str
  image: np.ndarray  # [H, W] uint8
  task: str
  prefix: str
  suffix: str
  label: str
  question_type: str | None = None  # 'closed' | 'open' for VQA
  objects: records.Objects | None = None
  report: str | None = None
  split: str | None = None

  def ground_truth(self):
    """JSON-friendly ground truth for evaluators (masks stay arrays)."""
    objs = self.objects
    return dict(
        image_id=self.image_id, patient_id=self.patient_id, source=self.source, task=self.task,
        prefix=self.prefix, suffix=self.suffix, label=self.label,
        question_type=self.question_type, report=self.report, split=self.split,
        height=int(self.image.shape[0]), width=int(self.image.shape[1]),
        objects=None if objs is None else dict(
            bbox=np.asarray(objs.bbox).tolist(), label=list(objs.label), mask=objs.mask))


def _regions(record):
  """[(lung, zone)] of every known abnormality, or None when unknown."""
  objs = record.objects
  if record.label == "tb" and not len(objs):
    return None
  out = []
  for i in range(len(objs)):
    lung = objs.lung[i] if objs.lung else None
    zone = objs.zone[i] if objs.zone else None
    if lung is None or zone is None:
      guess = records.lung_and_zone(objs.bbox[i])
      lung, zone = lung or guess[0], zone or guess[1]
    out.append((lung, zone))
  effusion = record.meta.get("findings", {}).get("effusion")
  if effusion:
    out.append((effusion, "lower"))
  if record.label == "sick_non_tb" and not out:
    return None
  return out


def vqa_pairs(record):
  """[(question, answer, type)] whose answers the record determines."""
  pairs = [(prompts.Q_TB, prompts.YES if record.label == "tb" else prompts.NO, "closed")]
  regions = _regions(record)
  if regions is not None:
    lungs = {lung for lung, _ in regions}
    pairs.append((prompts.Q_LEFT, prompts.YES if "left" in lungs else prompts.NO, "closed"))
    pairs.append((prompts.Q_RIGHT, prompts.YES if "right" in lungs else prompts.NO, "closed"))
    kinds = record.objects.kind or [None] * len(record.objects)
    if all(k is not None for k in kinds):
      pairs.append((prompts.Q_CAVITY, prompts.YES if "cavity" in kinds else prompts.NO, "closed"))
    which = "both" if len(lungs) == 2 else lungs.pop() if lungs else "none"
    pairs.append((prompts.Q_WHICH_LUNG, which, "open"))
    if record.label != "sick_non_tb":
      pairs.append((prompts.Q_HOW_MANY, str(len(record.objects)), "open"))
    counts = collections.Counter(zone for _, zone in regions)
    zone = max(records.ZONES, key=lambda z: (counts[z], -records.ZONES.index(z)))
    pairs.append((prompts.Q_WHICH_ZONE, zone if counts else "none", "open"))
  for qa in record.qa:
    q = qa["question"].strip().lower()
    q = q if q.startswith("answer en ") else f"answer en {q}"
    pairs.append((q, qa["answer"].strip().lower(), qa["type"]))
  return pairs


_DEFAULT_KIND = {"active tb": "opacity", "latent tb": "calcified lesion", "uncertain tb": "opacity"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _plural(word, n):
  if n == 1:
    return word
  word = word[:-1] + "ies" if word.endswith("y") else word + "s"
  return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {word}"


def template_report(record):
  """Deterministic lower-case report from the structured findings."""
  if record.label == "normal":
    return "the lungs are clear. no evidence of tuberculosis."
  if record.label == "sick_non_tb":
    effusion = record.meta.get("findings", {}).get("effusion")
    if effusion:
      return f"{effusion} pleural effusion. no evidence of tuberculosis."
    return "abnormal findings, not typical of tuberculosis."
  objs = record.objects
  regions = _regions(record) or []
  if not regions:
    return "findings consistent with tuberculosis."
  kinds = [(objs.kind[i] if objs.kind and objs.kind[i] else _DEFAULT_KIND[objs.label[i]])
           for i in range(len(objs))]
  sentences = []
  for lung in ("right", "left"):
    counts = collections.Counter((zone, kind) for (l, zone), kind in zip(regions, kinds) if l == lung)
    if counts:
      order = sorted(counts, key=lambda zk: (records.ZONES.index(zk[0]), zk[1]))
      parts = [f"{_plural(kind, counts[(zone, kind)])} in the {zone} zone" for zone, kind in order]
      sentences.append(f"{lung} lung: {', '.join(parts)}.")
  classes = sorted({name.split()[0] for name in objs.label})
  sentences.append(f"findings consistent with {' and '.join(classes)} tuberculosis.")
  return " ".join(sentences)


def _sorted_objects(objs):
  order = sorted(range(len(objs)), key=lambda i: (float(objs.bbox[i][0]), float(objs.bbox[i][1])))
  pick = lambda values: None if values is None else [values[i] for i in order]
  return records.Objects(
      bbox=np.asarray(objs.bbox, np.float32)[order].reshape(-1, 4), label=pick(objs.label),
      mask=None if objs.mask is None else objs.mask[order], lung=pick(objs.lung),
      zone=pick(objs.zone), kind=pick(objs.kind))


def box_masks(bbox, height, width):
  """Box-shaped masks [n, H, W] uint8 (weak segmentation targets)."""
  masks = np.zeros((len(bbox), height, width), np.uint8)
  px = np.round(np.asarray(bbox, np.float64).reshape(-1, 4) * [height, width, height, width]).astype(int)
  for i, (y0, x0, y1, x1) in enumerate(px):
    masks[i, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
  return masks


def curate(record, *, class_names, tasks=prompts.TASKS, seg_codec=None, seg_from_boxes=False):
  """All examples of `record` for `tasks` (see the module doc)."""
  unknown = set(tasks) - set(prompts.TASKS)
  if unknown:
    raise CurationError(f"unknown tasks {sorted(unknown)}; known: {prompts.TASKS}")
  objs = _sorted_objects(record.objects)
  base = dict(image_id=record.image_id, patient_id=record.patient_id, source=record.source,
              image=record.image, label=record.label, split=record.split)
  report = record.report.strip().lower() if record.report else template_report(record)
  lesions_known = record.label != "tb" or len(objs) > 0
  out = []
  for task in tasks:
    if task == "diagnosis":
      out.append(Example(task=task, prefix=prompts.DIAGNOSIS_PREFIX,
                         suffix=prompts.DIAGNOSIS_ANSWERS[record.label], **base))
    elif task == "vqa":
      for question, answer, qtype in vqa_pairs(record):
        out.append(Example(task=task, prefix=question, suffix=answer, question_type=qtype, **base))
    elif task == "report":
      out.append(Example(task=task, prefix=prompts.REPORT_PREFIX, suffix=report, report=report,
                         **base))
    elif task == "detection" and lesions_known:
      out.append(Example(task=task, prefix=prompts.detect_prefix(class_names),
                         suffix=loc_codec.format_objects(objs.bbox, objs.label), objects=objs,
                         **base))
    elif task == "segmentation" and lesions_known:
      if objs.mask is None and len(objs):
        if not seg_from_boxes:
          continue
        objs = dataclasses.replace(objs, mask=box_masks(objs.bbox, *record.image.shape))
      if seg_codec is None:
        raise CurationError(f"record {record.image_id!r}: the segmentation task needs a seg_codec "
                            "(big_vision_cxr.seg_codec); leave 'segmentation' out of tasks otherwise.")
      seg_ids = seg_codec.encode(objs.mask, objs.bbox) if len(objs) else None
      suffix = loc_codec.format_objects(objs.bbox, objs.label, seg_ids)
      out.append(Example(task=task, prefix=prompts.segment_prefix(class_names), suffix=suffix,
                         objects=objs, **base))
  return out


def summary(record):
  """What `task_counts` and `classes` need of a record, as JSON-able ints (no image):
  n_objects, n_vqa, lesions_known, masks_known, classes (bit i: CLASS_NAMES[i])."""
  objs = record.objects
  return dict(n_objects=len(objs), n_vqa=len(vqa_pairs(record)),
              lesions_known=int(record.label != "tb" or len(objs) > 0),
              masks_known=int(objs.mask is not None),
              classes=sum(1 << records.CLASS_NAMES.index(l) for l in set(objs.label)))


def classes(summary_):
  """The class names a `summary` says its record has."""
  return [c for i, c in enumerate(records.CLASS_NAMES) if summary_["classes"] >> i & 1]


def task_counts(summary_, tasks, *, seg_from_boxes=False, positives_only=False):
  """[number of examples `curate` gives per task in `tasks`] for a record's `summary`;
  positives_only: no detection/segmentation example without an object."""
  s = summary_
  known = bool(s["lesions_known"]) and (s["n_objects"] > 0 or not positives_only)
  seg = known and (bool(s["masks_known"]) or s["n_objects"] == 0 or seg_from_boxes)
  n = dict(diagnosis=1, vqa=s["n_vqa"], report=1, detection=int(known), segmentation=int(seg))
  return [n[t] for t in tasks]


def example(record, task, k, **kwargs):
  """The `k`-th `task` example of `record` (`curate`'s order); kwargs as in `curate`."""
  return curate(record, tasks=(task,), **kwargs)[k]
