"""Config loading (`file.py:arg`, `--config.a.b=value`) and validation before compiling.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`; `arg` is
the text after ':' and is parsed with `parse_arg` (big_vision style): `key=value,k2=v2`,
or bare words (`demo`) that set a boolean to True.
"""
import ast
import importlib.util
import pathlib

import ml_collections

from big_vision_cxr import errors


class ConfigError(errors.Error):
  """A config file, override or field value that cannot be used; names the field."""


def parse_arg(arg, **defaults):
  """'task=vqa,demo' -> ConfigDict(task='vqa', demo=True), typed like `defaults`."""
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} (in {arg!r}) is unknown; known: {sorted(defaults)}.")
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...).")
      out[key] = True
      continue
    out[key] = _convert(f"config arg {key}", value, defaults[key])
  return out


def load_config(spec):
  """'path/to/file.py:arg' -> ConfigDict from the file's get_config(arg)."""
  path, _, arg = str(spec).partition(":")
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist.")
  module_spec = importlib.util.spec_from_file_location(f"_bvcxr_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg) function.")
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:  # a config file's own checks of its args
    raise ConfigError(f"config {spec}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict.")
  return config


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a plain string


def _convert(field, text, current):
  """Parses `text` for a field whose current value is `current`, checking the type."""
  value = _literal(text)
  if current is None or isinstance(current, str) and not isinstance(value, str):
    return value if current is None else str(text)
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    if str(text).lower() in ("true", "false"):
      return str(text).lower() == "true"
    raise ConfigError(f"{field}={text!r}: expected a bool (True/False).")
  if isinstance(current, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{field}={text!r}: expected an int.")
    return value
  if isinstance(current, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{field}={text!r}: expected a float.")
    return float(value)
  if isinstance(current, str):
    return str(value)
  if isinstance(current, (list, tuple)):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{field}={text!r}: expected a list/tuple literal.")
    return type(current)(value)
  if isinstance(current, (dict, ml_collections.ConfigDict)):
    if not isinstance(value, dict):
      raise ConfigError(f"{field}={text!r}: expected a dict literal.")
    return value
  raise ConfigError(f"{field}: cannot override a field of type {type(current).__name__}.")


def apply_override(config, dotted, text):
  """config.a.b = text (parsed and type-checked against the current value)."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, key in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise ConfigError(f"--config.{dotted}: unknown field config.{'.'.join(parents[:i + 1])}.")
    node = node[key]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    raise ConfigError(f"--config.{dotted}: unknown field; known here: {known}.")
  with node.unlocked():
    node[leaf] = _convert(f"--config.{dotted}", text, node[leaf])


def parse_flags(argv):
  """argv -> (config, workdir). Flags: --config FILE[:ARG], --workdir DIR, --config.a.b=V."""
  parser = errors.ArgumentParser(prog="python -m big_vision_cxr.train")
  parser.add_argument("--config", required=True, help="config file, e.g. configs/cxr_mix.py:demo")
  parser.add_argument("--workdir", default=None, help="checkpoints, metrics.jsonl, TensorBoard")
  flags, rest = parser.parse_known_args(argv)
  config = load_config(flags.config)
  i = 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith("--config."):
      raise ConfigError(f"unknown command-line argument {item!r}.")
    key, eq, value = item[len("--config."):].partition("=")
    if not eq:
      if i + 1 >= len(rest):
        raise ConfigError(f"{item} needs a value.")
      i, value = i + 1, rest[i + 1]
    apply_override(config, key, value)
    i += 1
  return config, flags.workdir


def count_duration(config):
  """Exactly one of total_steps / total_epochs / total_examples."""
  given = [k for k in ("total_steps", "total_epochs", "total_examples") if config.get(k)]
  if len(given) != 1:
    raise ConfigError(f"give exactly one of config.total_steps / total_epochs / total_examples; "
                      f"got {given or 'none'}.")
  return given[0]


def total_steps(config, data_size=None):
  key = count_duration(config)
  batch = config.input.batch_size
  if key == "total_steps":
    return int(config.total_steps)
  if key == "total_examples":
    return -(-int(config.total_examples) // batch)
  if not data_size:
    raise ConfigError("config.total_epochs needs the training set size (not known for this input).")
  return -(-int(config.total_epochs * data_size) // batch)


def _validate_pp(config):
  """Every op in config.input.pp_image is a registered preprocessing op."""
  from big_vision_cxr.pp import builder  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.registry import PP_OPS  # pylint: disable=g-import-not-at-top
  spec = config.input.get("pp_image")
  if not spec:
    return
  try:
    ops = builder.parse(spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"config.input.pp_image={spec!r}: {e}") from None
  for op in ops:
    try:
      PP_OPS.get(op[0])
    except KeyError as e:
      raise ConfigError(f"config.input.pp_image={spec!r}: {e.args[0]}") from None


def validate(config):
  """Checks that need no devices or params: duration, names of models, evaluators, tasks."""
  from big_vision_cxr.models import common as model_common  # pylint: disable=g-import-not-at-top
  from big_vision_cxr.registry import EVALUATORS  # pylint: disable=g-import-not-at-top
  count_duration(config)
  if not isinstance(config.get("input", {}).get("batch_size"), int) or config.input.batch_size < 1:
    raise ConfigError(f"config.input.batch_size must be a positive int, got "
                      f"{config.get('input', {}).get('batch_size')!r}.")
  log_every = config.get("log_training_steps", 10)
  if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
    raise ConfigError(f"config.log_training_steps must be a positive int, got {log_every!r}.")
  if (config.get("param_dtype") or "float32") not in ("float32", "bfloat16"):
    raise ConfigError(f"config.param_dtype must be 'float32' or 'bfloat16', got "
                      f"{config.param_dtype!r}.")
  if config.get("microbatches", 1) < 1:
    raise ConfigError(f"config.microbatches must be >= 1, got {config.microbatches}.")
  model_common.model_module(config.model_name)
  for name, ev in (config.get("evals") or {}).items():
    if "type" not in ev:
      raise ConfigError(f"config.evals.{name} has no 'type'.")
    try:
      EVALUATORS.get(ev.type)
    except KeyError as e:
      raise ConfigError(f"config.evals.{name}.type: {e.args[0]}") from None
  if config.get("label_smoothing", 0.0) < 0 or config.get("label_smoothing", 0.0) >= 1:
    raise ConfigError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}.")
  loc_ls = config.get("loc_label_smoothing")
  if loc_ls and (set(loc_ls.keys()) != {"sigma_bins"} or not loc_ls["sigma_bins"] >= 0):
    raise ConfigError(f"config.loc_label_smoothing must be dict(sigma_bins=S) with S >= 0 (in "
                      f"<loc> bins), got {loc_ls}.")
  _validate_pp(config)
  if config.get("tokenizer") and not pathlib.Path(config.tokenizer).is_file():
    raise ConfigError(f"config.tokenizer={config.tokenizer!r}: file not found (a SentencePiece "
                      f".model; set --config.tokenizer=... or the BVCXR_TOKENIZER env var).")
  if config.get("model_init"):
    init_file = str(config.model_init).split(":")[0]
    if not pathlib.Path(init_file).is_file():
      raise ConfigError(
          f"config.model_init={config.model_init!r}: file not found. Download the official "
          f"PaliGemma .npz (e.g. paligemma-3b-pt-224.npz) and pass its path with "
          f"--config.model_init=/path/to/file.npz or the BVCXR_MODEL_INIT env var.")
