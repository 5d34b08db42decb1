"""Trivial baselines: what each task's metrics are for a model that learned nothing from images.

The trivial prediction is the most common training answer to the same prompt
(diagnosis, VQA, report; P(tb) = 0.5) and no objects (detection, segmentation).
The results table (table.py) puts each metric of the model next to that of the
baseline, scored by the same evaluator on the same records. Training stores the
answers with its final metrics (`to_json`); `training_majority` recomputes them
from a run's training data.
"""
import collections

OBJECT_TASKS = ("detection", "segmentation")


def majority_answers(units):
  """{(task, prefix): most common training suffix} and {(task, None): per task} from examples.

  units: {unit: [example with .task, .prefix, .suffix]}, as the training input has them.
  """
  by_prefix, by_task = collections.defaultdict(collections.Counter), collections.defaultdict(
      collections.Counter)
  for examples in units.values():
    for ex in examples:
      by_prefix[(ex.task, ex.prefix)][ex.suffix] += 1
      by_task[(ex.task, None)][ex.suffix] += 1
  return {k: c.most_common(1)[0][0] for k, c in {**by_prefix, **by_task}.items()}


def trivial_records(records, task, majority):
  """The records with each prediction replaced by the trivial one (`majority` as above)."""
  out = []
  for r in records:
    r = dict(r)
    if task in OBJECT_TASKS:
      r.update(prediction="", objects=[], n_invalid=0)
    else:
      r["prediction"] = majority.get((task, r.get("prefix")), majority.get((task, None), ""))
      if "p_tb" in r:
        r["p_tb"] = 0.5
    out.append(r)
  return out


def to_json(majority):
  """`majority_answers`' dict as a JSON-able list [[task, prefix or None, answer], ...]."""
  return [[task, prefix, answer] for (task, prefix), answer in majority.items()]


def from_json(rows):
  return {(task, prefix): answer for task, prefix, answer in rows}


def training_majority(input_config, *, class_names):
  """`majority_answers` of a run's training split (its input config), without the object tasks."""
  from big_vision_cxr import input_pipeline  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.data import prompts  # pylint: disable=g-import-not-at-top
  config = input_config.to_dict() if hasattr(input_config, "to_dict") else dict(input_config)
  tasks = [t for t in config.get("tasks") or prompts.TASKS if t not in OBJECT_TASKS]
  if not tasks:
    return {}
  return majority_answers(input_pipeline.curated_units(
      config, split=config.get("split", "train"), tasks=tasks, class_names=class_names))
