"""The results table: each headline metric per eval set and task, with a patient bootstrap CI.

One row per (eval set, task, metric) and, where the set mixes sources, one per
source as well; each row has `n` (records) and `patients`, the model's value,
its 95% interval and the trivial baseline's value (baselines.py), scored by the
same evaluator on the same records.

Bootstrap: patients are resampled with replacement (all their records come
along), within each source (each resample keeps every source's patient count),
`N_BOOT` = 1000 times with seed `SEED` = 0; the interval is the 2.5 and 97.5
percentiles of the resampled values (resamples where a metric is undefined are
dropped). Each resample is scored by the evaluator's `sampler`, the function its
own metrics are computed with (evaluators/common.py), so the point estimate and
the resamples are one computation. Records without `patient_id` count as one
patient each (by `image_id`).
"""
import collections
import math

import numpy as np

from big_vision_cxr.evaluators import baselines

N_BOOT, SEED = 1000, 0
# Rows every table has for a task (after those config.table_metrics lists first).
HEADLINE = {
    "diagnosis": ("accuracy", "auc", "sensitivity", "specificity", "ece"),
    "vqa": ("closed/accuracy",),
    "report": ("bleu4", "rougeL"),
    "detection": ("mean_loc/AP50", "ones/AP50", "empty_correct"),
    "segmentation": ("mean_loc/AP50", "ones/AP50", "empty_correct"),
    "perplexity": ("perplexity",),
}
MIXED = "pooled*"  # the source column of rows that pool several sources
_COLUMNS = ("set", "task", "metric", "source", "n", "patients", "model", "ci95", "trivial")


def patient_groups(records):
  """{source: [record indices of one patient, ...]} (patients in order of appearance)."""
  groups = collections.defaultdict(dict)
  for i, r in enumerate(records):
    patient = r.get("patient_id") or f"image:{r.get('image_id') or i}"
    groups[str(r.get("source") or "unknown")].setdefault(patient, []).append(i)
  return {src: [np.array(v, int) for v in pats.values()] for src, pats in groups.items()}


def bootstrap(sample, records, keys, *, n_boot=N_BOOT, seed=SEED):
  """{source or None (pooled): {key: (low, high)}} of `sample` (an evaluator's `sampler`).

  Per-source intervals come from the same resamples, given only when sources mix.
  """
  groups = patient_groups(records)
  sources = sorted(groups) if len(groups) > 1 else []
  values = {s: collections.defaultdict(list) for s in [None] + sources}
  rng = np.random.default_rng(seed)
  for _ in range(n_boot):
    drawn = {s: np.concatenate([groups[s][j] for j in rng.integers(0, len(groups[s]), len(groups[s]))])
             for s in sorted(groups)}
    pooled = np.concatenate([drawn[s] for s in sorted(groups)])
    parts = [(None, pooled)] + [(s, drawn[s]) for s in sources]
    for src, idx in parts:
      metrics = sample(idx)
      for k in keys:
        v = metrics.get(k, float("nan"))
        if not math.isnan(v):
          values[src][k].append(v)
  return {src: {k: (float(np.quantile(v[k], 0.025)), float(np.quantile(v[k], 0.975))) if v[k]
                else (float("nan"), float("nan")) for k in keys} for src, v in values.items()}


def table_metrics(evaluator, configured=()):
  """The metrics of an evaluator's rows: `configured` ones first, then the task's HEADLINE."""
  return list(dict.fromkeys(list(configured or ()) + list(HEADLINE.get(evaluator.task, ()))))


def results_table(evaluators, records, results, majority, *, table_metrics_cfg=None,
                  n_boot=N_BOOT, seed=SEED):
  """The table of evaluators' records: {'rows': [...], 'notes': [...], 'bootstrap': {...}}.

  evaluators: {name: (evaluator, every)} (common.from_config); records: {name:
  prediction records}; results: {'name/metric': value}, the metrics the evaluators
  computed; majority: baselines.majority_answers of the training data, or None
  when unknown (then only detection and segmentation have a trivial value);
  table_metrics_cfg: {name: [metric, ...]} listed before the HEADLINE ones.
  Evaluators without records are left out.
  """
  rows, notes = [], []
  for name, (evaluator, _) in evaluators.items():
    if not records.get(name):
      continue
    recs, task, kw = records[name], evaluator.task, evaluator.metric_kw
    keys = table_metrics(evaluator, (table_metrics_cfg or {}).get(name))
    trivial = {}
    if majority is not None or task in baselines.OBJECT_TASKS:
      trivial = evaluator.compute_metrics(baselines.trivial_records(recs, task, majority or {}), **kw)
    groups = patient_groups(recs)
    intervals = bootstrap(evaluator.sampler(recs, **kw), recs, keys, n_boot=n_boot, seed=seed)
    mixed = len(groups) > 1
    set_name = evaluator.eval_set or name
    note = (f"{set_name}: rows marked {MIXED} pool the sources {', '.join(sorted(groups))}; a pooled "
            f"metric can reward telling the sources apart: read the per-source rows.")
    if mixed and note not in notes:
      notes.append(note)
    for src in [None] + (sorted(groups) if mixed else []):
      prefix = "" if src is None else f"by_source/{src}/"
      pats = groups[src] if src is not None else [p for g in groups.values() for p in g]
      for k in keys:
        low, high = intervals[src][k]
        rows.append(dict(
            set=set_name, task=task, metric=k, eval=name,
            source=src or (MIXED if mixed else next(iter(groups), "")),
            n=int(sum(len(p) for p in pats)), patients=len(pats),
            model=float(results.get(f"{name}/{prefix}{k}", float("nan"))),
            ci95_low=low, ci95_high=high,
            trivial=float(trivial.get(f"{prefix}{k}", float("nan")))))
  if majority is None and any(r["task"] not in baselines.OBJECT_TASKS for r in rows):
    notes.append("trivial: no training answers were found, so only detection and segmentation "
                 "have a trivial baseline.")
  return dict(rows=rows, notes=notes, bootstrap=dict(
      unit="patient", strata="source", resamples=n_boot, seed=seed, interval="percentile 2.5-97.5"))


def _num(v):
  return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def _cells(row):
  ci = "n/a" if math.isnan(row["ci95_low"]) else f"[{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]"
  return dict(set=row["set"], task=row["task"], metric=row["metric"], source=row["source"],
              n=str(row["n"]), patients=str(row["patients"]), model=_num(row["model"]), ci95=ci,
              trivial=_num(row["trivial"]))


def _footer(table):
  b = table["bootstrap"]
  return [f"95% CI: {b['resamples']} bootstrap resamples of patients within each source "
          f"(seed {b['seed']}), 2.5-97.5 percentiles."] + table["notes"]


def to_text(table):
  """The table as aligned text (what training and `evaluate` print)."""
  head = dict(set="eval set", task="task", metric="metric", source="source", n="n",
              patients="patients", model="model", ci95="95% CI", trivial="trivial")
  cells = [_cells(r) for r in table["rows"]]
  width = {c: max([len(head[c])] + [len(x[c]) for x in cells]) for c in _COLUMNS}
  width["task"], width["metric"] = max(width["task"], 13), max(width["metric"], 18)
  right = ("n", "patients", "model", "ci95", "trivial")
  line = lambda x: " ".join(f"{x[c]:>{width[c]}}" if c in right else f"{x[c]:<{width[c]}}"
                            for c in _COLUMNS).rstrip()
  lines = [line(head), "-" * len(line(head))] + [line(x) for x in cells]
  return "\n".join(lines + _footer(table))


def to_markdown(table):
  """The table as a Markdown table and its notes."""
  head = ("eval set", "task", "metric", "source", "n", "patients", "model", "95% CI", "trivial")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---|" + "--:|" * 5]
  escape = lambda text: text.replace("*", "\\*").replace("|", "\\|")
  lines += ["| " + " | ".join(escape(_cells(r)[c]) for c in _COLUMNS) + " |" for r in table["rows"]]
  return "\n".join(lines + [""] + [f"- {escape(n)}" for n in _footer(table)]) + "\n"
