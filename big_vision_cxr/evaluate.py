"""Evaluates a trained checkpoint anywhere: the run's evals, or any dataset as an external test set.

  python -m big_vision_cxr.evaluate --workdir W [--step N] [--eval NAME=DATASET ...] [--out DIR]

The model is loaded with the settings stored in W (inference.load: class names,
prompts, image preprocessing, tokenizer, VQ-VAE), and evaluated on the training
config's `evals` (each may name its own datasets, evaluators/common.from_config)
and on every `--eval NAME=DATASET` set with each of the config's evaluators (or,
without any, the default evaluator of each task the run trained). DATASET is a
dataset config as JSON, `{"source": "manifest", "preset": "nih_cxr14", "path":
"..."}`, optionally with "split" (default: the whole dataset), or
`{"datasets": {name: config, ...}, "split": ...}` for several; or the short form
SOURCE:PATH[@SPLIT] with SOURCE a data source (tbx11k, manifest, tfds: PATH is
its `path`, for tfds its `name`) or `nih_cxr14` (a manifest with that preset).

Writes into --out (default W/eval-STEP/): results.json (the table, every
metric), results.md (the table), the prediction records of each eval
(records/NAME.jsonl, for `python -m big_vision_cxr.evaluators`) and the
pictures (evaluators/plots.py); prints the table (evaluators/table.py).
"""
import json
import logging
import math
import pathlib
import re
import sys
import time

import ml_collections

from big_vision_cxr import atomic
from big_vision_cxr import errors
from big_vision_cxr import host_allocator
from big_vision_cxr import inference
from big_vision_cxr import input_pipeline
from big_vision_cxr import metric_writer
from big_vision_cxr import run_settings
from big_vision_cxr.data.prompts import TASKS
from big_vision_cxr.evaluators import baselines
from big_vision_cxr.evaluators import common
from big_vision_cxr.evaluators import plots
from big_vision_cxr.evaluators import table as table_lib
from big_vision_cxr.registry import DATA_SOURCES

_NAME = re.compile(r"[A-Za-z0-9_+-]+")
_NOT_COPIED = ("datasets", "split", "set", "log_steps", "outfile")  # what an --eval set replaces


class EvaluateError(errors.Error):
  """An evaluate argument or workdir that cannot be used."""


def parse_dataset(spec, where):
  """A DATASET argument -> (datasets {name: config}, split or None) (see the module doc).

  `where` names the argument in errors; a single dataset is named by the caller.
  """
  if spec.lstrip().startswith("{"):
    try:
      value = json.loads(spec)
    except ValueError as e:
      raise EvaluateError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}).") from None
    if "datasets" in value:
      datasets = value["datasets"]
      if not isinstance(datasets, dict) or not datasets or not all(
          isinstance(v, dict) and "source" in v for v in datasets.values()):
        raise EvaluateError(f"{where}: datasets must map names to dataset configs with a 'source'.")
      bad = [k for k in datasets if not _NAME.fullmatch(k)]
      if bad:
        raise EvaluateError(f"{where}: dataset name {bad[0]!r}: use letters, digits, '_', '+' or '-'.")
      out, split = datasets, value.get("split")
    elif "source" not in value:
      raise EvaluateError(f"{where}: a dataset config needs a 'source' (one of {DATA_SOURCES.names()}).")
    else:
      value = dict(value)
      split = value.pop("split", None)
      out = {None: value}
    for s in [split] + [v.get("split") for v in out.values()]:
      if s is not None and not isinstance(s, str):
        raise EvaluateError(f"{where}: split must be a string (or absent: the whole dataset), got {s!r}.")
    return out, split
  kind, sep, path = spec.partition(":")
  if not sep or not path:
    raise EvaluateError(f"{where}: expected a JSON dataset config or SOURCE:PATH[@SPLIT], got {spec!r}.")
  split = None
  if "@" in path and re.fullmatch(r"[A-Za-z0-9_-]+", path.rsplit("@", 1)[1]):
    path, split = path.rsplit("@", 1)
  if kind == "nih_cxr14":
    return {None: dict(source="manifest", preset="nih_cxr14", path=path)}, split
  if kind not in DATA_SOURCES.names():
    raise EvaluateError(f"{where}: unknown source {kind!r}; use one of "
                        f"{DATA_SOURCES.names() + ['nih_cxr14']}, or a JSON dataset config.")
  return {None: dict(source=kind, **{"name" if kind == "tfds" else "path": path})}, split


def eval_sets(config, resolved, specs, *, tasks=None, batch_size=None, config_evals=True):
  """({eval name: eval config}, {eval name: table metrics}): config.evals (unless not
  config_evals) and each --eval set.

  An --eval set NAME gets one eval per evaluator of config.evals (per task, the
  first), named NAME/<eval>, with its config.table_metrics; without config evals,
  one per task the run trained (`common.TASK_EVALS`). `tasks` keeps only those tasks.
  """
  stored = {k: v.to_dict() for k, v in (config.get("evals") or {}).items()}
  templates = {}
  for k, ev in stored.items():
    if ev.get("task") not in {t["task"] for t in templates.values()}:
      templates[k] = {f: v for f, v in ev.items() if f not in _NOT_COPIED}
  if not templates:
    templates = {t: dict(common.TASK_EVALS[t], task=t, batch_size=16) for t in resolved["tasks"]}
  if tasks:
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
      raise EvaluateError(f"--tasks: unknown tasks {unknown}; known: {', '.join(TASKS)}.")
    stored = {k: v for k, v in stored.items() if v.get("task") in tasks}
    templates = {k: v for k, v in templates.items() if v["task"] in tasks}
    missing = sorted(set(tasks) - {t["task"] for t in templates.values()})
    templates.update({t: dict(common.TASK_EVALS[t], task=t, batch_size=16) for t in missing})
  metrics = {k: list(v) for k, v in (config.get("table_metrics") or {}).items()}
  out = {}
  if config_evals:
    out = {k: {f: v for f, v in ev.items() if f != "outfile"} for k, ev in stored.items()}
  for name, spec in specs:
    datasets, split = parse_dataset(spec, f"--eval {name}")
    datasets = {(k if k is not None else name): v for k, v in datasets.items()}
    for k, template in templates.items():
      out[f"{name}/{k}"] = dict(template, datasets=datasets, split=split, set=name)
      metrics[f"{name}/{k}"] = metrics.get(k, [])
  if batch_size:
    for ev in out.values():
      ev["batch_size"] = batch_size
  if not out:
    raise EvaluateError("nothing to evaluate: the run's config has no evals (for these tasks); "
                        "name a dataset with --eval NAME=DATASET.")
  return out, metrics


def _null_nan(value):
  """`value` with NaN (an undefined metric) as None, so the file is strict JSON."""
  if isinstance(value, dict):
    return {k: _null_nan(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_null_nan(v) for v in value]
  return None if isinstance(value, float) and math.isnan(value) else value


def _training_data_readable(input_config):
  """Whether the run's training datasets can be read here (a warning says why not)."""
  try:
    for name, cfg in input_config.datasets.items():
      input_pipeline.load_records(name, cfg)
  except (errors.Error, OSError) as e:
    logging.warning("the training data cannot be read here (%s): patients are not checked "
                    "against the training split, and the trivial baseline of diagnosis/vqa/"
                    "report needs the answers training stored in final_metrics.json.", e)
    return False
  return True


def _majority(workdir, config, class_names, readable):
  """The training answers of the trivial baseline: stored by training, else recomputed from
  the training data; None when neither is there (the table says so)."""
  final = pathlib.Path(workdir) / "final_metrics.json"
  if final.is_file():
    stored = json.loads(final.read_text(encoding="utf-8")).get("majority")
    if stored is not None:
      return baselines.from_json(stored)
  return baselines.training_majority(config.input, class_names=class_names) if readable else None


def shared_patients_report(config, evals, readable):
  """{eval: [patient_overlap report per dataset part]}: what shared_patients='drop' left out."""
  out = {}
  for name, ev in evals.items():
    ev = dict(ev)
    parts = (common.eval_parts(config.input, ev["datasets"], ev.get("split"))
             if ev.get("datasets") else [(config.input, ev.get("split"))])
    out[name] = [input_pipeline.patient_overlap(
        part, split=split, train_config=config.input if readable else None)
                 for part, split in parts]
  return out


def evaluate(workdir, *, step=None, specs=(), out=None, tasks=None, batch_size=None,
             config_evals=True, shared_patients=None, n_boot=table_lib.N_BOOT):
  """Evaluates the checkpoint; returns dict(table, metrics, records, out, plots)."""
  workdir = pathlib.Path(workdir)
  stored = run_settings.read(workdir) if workdir.is_dir() else None
  if stored is None:
    raise EvaluateError(f"--workdir {workdir}: not a training workdir (no {run_settings.FILENAME}).")
  config, resolved = stored
  evals, table_metrics = eval_sets(config, resolved, specs, tasks=tasks, batch_size=batch_size,
                                   config_evals=config_evals)
  if out:  # before the slow part
    out = atomic.writable_dir(out, "--out")
  loaded = inference.load(workdir, step=step,
                          with_vqvae=any(ev["type"] == "segmentation" for ev in evals.values()))
  step = loaded.provenance["step"]
  out = out or atomic.writable_dir(workdir / f"eval-{step}", "--out")
  config = ml_collections.ConfigDict(config.to_dict())
  config.input.pp_image = loaded.pp_image  # training's preprocessing, as stored
  config.evals = evals
  if shared_patients:
    config.input.shared_patients = shared_patients
  readable = _training_data_readable(config.input)
  evaluators = common.from_config(config, loaded.model, loaded.tokenizer, loaded.seg_codec,
                                  class_names=loaded.class_names, image_size=loaded.image_size,
                                  check_train_patients=readable)
  results, records = {}, {}
  for name, (evaluator, _) in evaluators.items():
    t0 = time.perf_counter()
    records[name] = evaluator.predict(loaded.params)
    common.write_jsonl(out / "records" / f"{name.replace('/', '.')}.jsonl", records[name])
    if not records[name]:
      logging.warning("eval %s: no %s examples in %s", name, evaluator.task, evaluator.eval_set)
      continue
    results.update({f"{name}/{k}": float(v) for k, v in
                    evaluator.compute_metrics(records[name], **evaluator.metric_kw).items()})
    logging.info("eval %s: %d records in %.0f s", name, len(records[name]), time.perf_counter() - t0)
  table = table_lib.results_table(
      evaluators, {k: v for k, v in records.items() if v}, results,
      _majority(workdir, config, loaded.class_names, readable),
      table_metrics_cfg=table_metrics, n_boot=n_boot)
  pictures = plots.draw(out, evaluators, records, workdir / "metrics.jsonl")
  common.write_json(out / "results.json", _null_nan(dict(
      checkpoint=str(workdir), step=step, class_names=list(loaded.class_names),
      pp_image=loaded.pp_image, evals=evals, table=table, metrics=results,
      shared_patients=shared_patients_report(config, evals, readable))))
  atomic.write_text(out / "results.md", f"# Evaluation of {workdir} at step {step}\n\n"
                    + table_lib.to_markdown(table)
                    + "".join(f"\n![{p.stem}]({p.name})\n" for p in pictures))
  return dict(table=table, metrics=results, records=records, out=out, plots=pictures)


def main(argv=None):
  p = errors.ArgumentParser(
      prog="python -m big_vision_cxr.evaluate",
      description="Evaluate a trained checkpoint on its evals and on external datasets "
                  "(docs/EVALUATION.md).",
      epilog="--debug: show the traceback of an error; --verbose: the libraries' INFO lines.")
  p.add_argument("--workdir", required=True, help="the training workdir (holds config.json)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--eval", action="append", default=[], metavar="NAME=DATASET",
                 help="an eval set: a JSON dataset config (+ optional split) or SOURCE:PATH[@SPLIT]")
  p.add_argument("--out", help="output folder (default: WORKDIR/eval-STEP)")
  p.add_argument("--tasks", help="comma-separated tasks to evaluate (default: the config's)")
  p.add_argument("--batch_size", type=int, help="evaluation batch size (default: each eval's)")
  p.add_argument("--no_config_evals", action="store_true",
                 help="evaluate only the --eval sets, not the training config's evals")
  p.add_argument("--shared_patients", choices=("error", "drop"),
                 help="patients of the run's training split in an --eval set: an error (the "
                      "run's setting, default) or left out")
  p.add_argument("--n_boot", type=int, default=table_lib.N_BOOT,
                 help=f"bootstrap resamples (default {table_lib.N_BOOT})")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  specs = []
  for item in args.eval:
    name, sep, spec = item.partition("=")
    if not sep or not _NAME.fullmatch(name) or not spec:
      raise EvaluateError(f"--eval {item!r}: expected NAME=DATASET with NAME of letters, digits, "
                          f"'_', '+' or '-'.")
    if name in [n for n, _ in specs]:
      raise EvaluateError(f"--eval {name}: given twice.")
    specs.append((name, spec))
  for flag, value in (("--step", args.step), ("--batch_size", args.batch_size),
                      ("--n_boot", args.n_boot)):
    if value is not None and value < (0 if flag == "--step" else 1):
      raise EvaluateError(f"{flag} must be {'>= 0' if flag == '--step' else 'positive'}, got {value}.")
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
  metric_writer.setup_logging(verbose=args.verbose)
  done = evaluate(args.workdir, step=args.step, specs=specs, out=args.out, tasks=tasks,
                  batch_size=args.batch_size, config_evals=not args.no_config_evals,
                  shared_patients=args.shared_patients, n_boot=args.n_boot)
  print(table_lib.to_text(done["table"]), flush=True)
  print(f"done: results.json, results.md, {len(done['plots'])} pictures and the records in {done['out']}")
  return 0


if __name__ == "__main__":
  host_allocator.reexec()
  sys.exit(errors.cli_main(main))
