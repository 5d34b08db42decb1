"""Patients shared by datasets used together, or by the training and evaluated splits.

    kept, report = patients.resolve({name: records}, policy="drop",
                                    train={name: train records}, split="test")

Within one dataset a patient is in one split (data/splits.py). Across datasets
nothing keeps one person's images apart, so a patient id in two datasets used
together is an error, and so is a patient of the evaluated split who is in the
training split of the run being evaluated (`train`). With policy='drop' those
patients' images are left out instead: from every dataset for the first kind,
from the evaluated split for the second; the report says which.

Patient ids are compared as the datasets give them, as strings: a hospital's
'123' and another's '123' count as one person. Where they are different people,
give each dataset its own `patient_id_prefix` (input_pipeline).
"""
import collections
import logging

from big_vision_cxr import errors

POLICIES = ("error", "drop")
_LOGGED = set()
_HINT = ("patient ids are compared as strings: give each dataset its own patient_id_prefix if "
         "these are different people, else set config.input.shared_patients='drop'")
_SPLIT_HINT = ("other datasets or split settings (split_seed, split_fractions, split_map) than "
               "training's move trained patients into it; set config.input.shared_patients='drop' "
               "to evaluate without them")


class SharedPatientsError(errors.Error):
  """A patient is in two datasets, or in training and the evaluated split."""


def _images(recs_by_dataset, pids):
  """{patient_id: [dict(dataset, image_id, split)]} of the patients `pids`."""
  out = collections.defaultdict(list)
  for name, recs in recs_by_dataset.items():
    for r in recs:
      if r.patient_id in pids:
        out[r.patient_id].append(dict(dataset=name, image_id=r.image_id, split=r.split))
  return out


def across_datasets(recs_by_dataset):
  """[dict(patient_id, datasets, images)] of the patients in two or more datasets."""
  where = collections.defaultdict(set)
  for name, recs in recs_by_dataset.items():
    for r in recs:
      where[r.patient_id].add(name)
  shared = {p for p, names in where.items() if len(names) > 1}
  imgs = _images(recs_by_dataset, shared)
  return [dict(patient_id=p, datasets=sorted(where[p]), images=imgs[p]) for p in sorted(shared)]


def across_splits(train, evaluated):
  """[dict(patient_id, train, evaluated)] of the patients of `evaluated` also in `train`
  (both {dataset: records}); `train` and `evaluated` list their images."""
  shared = ({r.patient_id for recs in train.values() for r in recs}
            & {r.patient_id for recs in evaluated.values() for r in recs})
  tr, ev = _images(train, shared), _images(evaluated, shared)
  return [dict(patient_id=p, train=tr[p], evaluated=ev[p]) for p in sorted(shared)]


def _where(imgs):
  return ", ".join(f"{i['dataset']}:{i['image_id']} ({i['split']})" for i in imgs[:4]) + (
      ", ..." if len(imgs) > 4 else "")


def resolve(recs_by_dataset, *, policy="error", train=None, split=None, train_split="train"):
  """({dataset: records without the dropped patients}, report); SharedPatientsError under
  policy='error'. `train` ({dataset: training-split records}) and `split` (the evaluated
  one) add the check between them. The report (JSON-able): policy, split, train_split,
  across_datasets, across_splits (see the functions), dropped_patients, dropped_images."""
  if policy not in POLICIES:
    raise SharedPatientsError(f"config.input.shared_patients must be one of {POLICIES}, got {policy!r}")
  by_dataset = across_datasets(recs_by_dataset)
  by_split = []
  if train is not None:
    evaluated = {n: [r for r in recs if r.split == split] for n, recs in recs_by_dataset.items()}
    by_split = across_splits(train, evaluated)
  if policy == "error" and by_dataset:
    s = by_dataset[0]
    raise SharedPatientsError(
        f"patient {s['patient_id']!r} is in datasets {', '.join(map(repr, s['datasets']))}: "
        f"{_where(s['images'])}; {len(by_dataset)} patients are shared by datasets in all. {_HINT}")
  if policy == "error" and by_split:
    s = by_split[0]
    raise SharedPatientsError(
        f"patient {s['patient_id']!r} of the evaluated split {split!r} ({_where(s['evaluated'])}) "
        f"is in the training split {train_split!r} ({_where(s['train'])}); {len(by_split)} "
        f"evaluated patients were trained on in all. {_SPLIT_HINT}")
  everywhere = {s["patient_id"] for s in by_dataset}
  evaluated_only = {s["patient_id"] for s in by_split}
  drop = lambda r: r.patient_id in everywhere or (r.patient_id in evaluated_only and r.split == split)
  kept = {n: [r for r in recs if not drop(r)] for n, recs in recs_by_dataset.items()}
  report = dict(policy=policy, split=split if train is not None else None,
                train_split=train_split if train is not None else None,
                across_datasets=by_dataset, across_splits=by_split,
                dropped_patients=len(everywhere | evaluated_only),
                dropped_images=sum(len(recs_by_dataset[n]) - len(kept[n]) for n in kept))
  msg = (f"shared_patients='drop': left out {report['dropped_patients']} patients "
         f"({report['dropped_images']} images) shared by datasets or with training: "
         f"{sorted(everywhere | evaluated_only)[:10]}")
  if report["dropped_patients"] and msg not in _LOGGED:  # once, not per evaluator
    _LOGGED.add(msg)
    logging.warning(msg)
  return kept, report
