"""Pictures of an evaluation (matplotlib, Agg canvas, PNG): what the results table summarises.

- `roc`: the diagnosis ROC curve of P(tb) with the WHO triage target (sensitivity
  >= 0.9 at specificity >= 0.7) shaded and the operating point the diagnosis
  evaluator reports (`who_*`) marked.
- `calibration`: the reliability diagram of P(tb) (10 bins) with its ECE.
- `pr`: detection / segmentation precision-recall at IoU 0.5 (pycocotools'
  interpolated precision at 101 recall points, the curve AP50 averages).
- `losses`: the per-task training losses of metrics.jsonl.
`draw` makes every picture an evaluation's records allow. The numbers come from
the evaluators (diagnosis.roc_curve / calibration_bins, coco.Matches.curves).
"""
import io
import json
import re

import numpy as np
from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib

from big_vision_cxr import atomic
from big_vision_cxr.evaluators import coco
from big_vision_cxr.evaluators import detection
from big_vision_cxr.evaluators import diagnosis
from big_vision_cxr.evaluators import segmentation


def _figure(width=5.0, height=4.5):
  fig = figure_lib.Figure(figsize=(width, height), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def save(fig, path):
  """Writes `fig` as a PNG at `path` (atomically)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  atomic.write_bytes(path, buf.getvalue())
  return path


def roc(y, p_tb, title):
  """The ROC curve of P(tb) with the WHO target region and the reported WHO operating point."""
  fpr, tpr, _ = diagnosis.roc_curve(y, p_tb)
  fig = _figure()
  ax = fig.subplots()
  target_fpr = 1 - diagnosis.WHO_SPECIFICITY
  target = f"WHO target: sens >= {diagnosis.WHO_SENSITIVITY:g}, spec >= {diagnosis.WHO_SPECIFICITY:g}"
  ax.fill_between([0, target_fpr], diagnosis.WHO_SENSITIVITY, 1, color="tab:green", alpha=0.15,
                  label=target)
  ax.plot([target_fpr], [diagnosis.WHO_SENSITIVITY], "s", color="tab:green")
  ax.plot(fpr, tpr, "-", color="tab:blue", label=f"model (AUC {diagnosis.auc(y, p_tb):.3f})")
  t, sens, spec = diagnosis.who_operating_point(y, p_tb)
  if not np.isnan(t):
    ax.plot([1 - spec], [sens], "o", color="tab:red",
            label=f"p_tb >= {t:.3g}: sens {sens:.2f}, spec {spec:.2f}")
  ax.plot([0, 1], [0, 1], ":", color="grey")
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity", title=title)
  ax.legend(loc="lower right", fontsize=8)
  return fig


def calibration(y, p_tb, title, n_bins=diagnosis.CALIBRATION_BINS):
  """Observed TB fraction against mean P(tb) per bin, and how many records each bin holds."""
  count, mean_p, frac = diagnosis.calibration_bins(y, p_tb, n_bins)
  ece = diagnosis.expected_calibration_error(y, p_tb, n_bins)
  fig = _figure(5.0, 5.5)
  ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
  full = count > 0
  ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
  ax.plot(mean_p[full], frac[full], "o-", color="tab:blue", label="model")
  ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="fraction TB", title=f"{title}\nECE {ece:.3f}")
  ax.legend(loc="upper left", fontsize=8)
  edges = np.linspace(0, 1, n_bins + 1)
  hist.bar(edges[:-1], count, width=1 / n_bins, align="edge", color="tab:grey", edgecolor="white")
  hist.set(xlabel="P(tb)", ylabel="records")
  return fig


def pr(curves, title):
  """Precision-recall at IoU 0.5: {rule: {'agnostic' | class: precision at coco.RECALL}}."""
  fig = _figure()
  ax = fig.subplots()
  colors = {}
  for rule, by_class in curves.items():
    for name, precision in by_class.items():
      color = colors.setdefault(name, f"C{len(colors)}")
      ap50 = np.nanmean(precision) if not np.isnan(precision).all() else float("nan")
      ax.plot(coco.RECALL, precision, "-" if rule != "ones" else "--", color=color,
              label=f"{name}, {rule} (AP50 {ap50:.3f})")
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision (interpolated)", title=title)
  ax.legend(loc="upper right", fontsize=7)
  return fig


def losses(rows, title="training loss"):
  """Per-task training loss (and the total) against step, from metrics.jsonl rows."""
  fig = _figure(6.0, 4.0)
  ax = fig.subplots()
  keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")})
  for k in keys:
    points = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
    ax.plot(*zip(*points), "-" if k != "loss" else "k-", label=k.split("/")[-1] if k != "loss" else "all")
  ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
  ax.legend(fontsize=8)
  return fig


def read_metrics(path):
  """The rows of a metrics.jsonl (unreadable lines skipped)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def _file_name(*parts):
  return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(parts)) + ".png"


def draw(out_dir, evaluators, records, metrics_jsonl=None):
  """Every picture the records allow, written into `out_dir`; returns the paths.

  evaluators: {name: (evaluator, every)}; records: {name: prediction records}.
  """
  paths = []
  for name, (evaluator, _) in evaluators.items():
    recs = records.get(name)
    if not recs:
      continue
    label = f"{evaluator.eval_set or name}, {evaluator.task}"
    if evaluator.name == "diagnosis" and all(r.get("p_tb") is not None for r in recs):
      y = np.array([r["label"] == "tb" for r in recs])
      p_tb = np.array([r["p_tb"] for r in recs], np.float64)
      paths.append(save(roc(y, p_tb, f"ROC: {label}"), out_dir / _file_name("roc", label)))
      paths.append(save(calibration(y, p_tb, f"Calibration of P(tb): {label}"),
                        out_dir / _file_name("calibration", label)))
    elif evaluator.name in ("detection", "segmentation"):
      module = detection if evaluator.name == "detection" else segmentation
      curves = module.pr_curves(recs, **evaluator.metric_kw)
      paths.append(save(pr(curves, f"PR at IoU 0.5: {label}"), out_dir / _file_name("pr", label)))
  if metrics_jsonl is not None and metrics_jsonl.is_file():
    rows = [r for r in read_metrics(metrics_jsonl) if "loss" in r]
    if rows:
      paths.append(save(losses(rows), out_dir / "training_loss.png"))
  return paths
