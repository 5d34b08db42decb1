"""Trivial baselines: what each task's metrics are for a model that learned nothing from images.

The trivial prediction is the most common training answer to the same prompt
(diagnosis, VQA, report; P(tb) = 0.5) and no objects (detection, segmentation).
`baseline_table` puts each metric of the model next to that of the baseline,
scored by the same evaluator on the same records.
"""
import collections


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
    if task in ("detection", "segmentation"):
      r.update(prediction="", objects=[], n_invalid=0)
    else:
      r["prediction"] = majority.get((task, r.get("prefix")), majority.get((task, None), ""))
      if "p_tb" in r:
        r["p_tb"] = 0.5
    out.append(r)
  return out


def baseline_table(evaluators, records, results, majority, *, tasks, table_metrics):
  """Per-task metrics of the model next to the trivial baseline's.

  evaluators: {name: (evaluator, every)}; records: {name: prediction records};
  results: {'name/metric': value}; majority: `majority_answers` of the training
  data; tasks: {name: task} (config.evals[name].task); table_metrics: {name:
  [metric, ...]} (config.table_metrics; None: no rows). Evaluators without
  records are left out. Returns (rows, text): rows = [(task, metric, model, baseline)].
  """
  rows = []
  for name, (evaluator, _) in evaluators.items():
    if name not in records:
      continue
    task = tasks[name]
    trivial = evaluator.compute_metrics(trivial_records(records[name], task, majority),
                                        **evaluator.metric_kw)
    for metric in (table_metrics or {}).get(name, ()):
      model_value = results.get(f"{name}/{metric}", float("nan"))
      rows.append((task, metric, model_value, float(trivial.get(metric, float("nan")))))
  lines = [f"{'task':<13} {'metric':<18} {'model':>8} {'trivial':>8}",
           "-" * 50]
  lines += [f"{t:<13} {m:<18} {v:>8.3f} {b:>8.3f}" for t, m, v, b in rows]
  return rows, "\n".join(lines)
