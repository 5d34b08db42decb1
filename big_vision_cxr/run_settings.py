"""The settings a trained model depends on, resolved once and stored with its checkpoints.

At the start of training the trainer writes `{workdir}/config.json`:
  {"config": the full config, "resolved": {model_name, variant, image_size, tasks,
   class_names, prompts, pp_image, text_len, tokenizer: {path, sha256},
   vqvae: {path, sha256} | None, lora}}
predict, serving and convert export read it, so a model is always
prompted and preprocessed exactly as it was trained. A value given on their
command line that contradicts the stored one is an error naming both.
"""
import hashlib
import json
import pathlib

import ml_collections

from big_vision_cxr import atomic
from big_vision_cxr import errors
from big_vision_cxr import seg_codec as seg_codec_lib
from big_vision_cxr.data import prompts as prompts_lib

FILENAME = "config.json"
ASSETS = pathlib.Path(__file__).parent / "assets"


class SettingsError(errors.Error):
  """Stored run settings that are missing, unreadable or contradicted."""


def sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_entry(path):
  path = pathlib.Path(path).absolute()
  return dict(path=str(path), sha256=sha256(path))


def resolve(config, model_cfg, *, class_names):
  """The resolved block for `config` (model_cfg = its model config, class_names = training's)."""
  tasks = list(config.input.get("tasks") or prompts_lib.TASKS)
  vqvae = None
  if "segmentation" in tasks:
    vqvae = file_entry(seg_codec_lib.npz_path(config.input.get("seg_codec")))
  return dict(
      model_name=config.model_name, variant=config.model.variant,
      image_size=int(model_cfg.img.image_size), tasks=tasks,
      class_names=sorted(class_names), prompts=prompts_lib.task_prompts(sorted(class_names)),
      pp_image=config.input.get("pp_image") or "", text_len=int(config.input.text_len),
      tokenizer=file_entry(config.tokenizer), vqvae=vqvae,
      lora=_plain(config.get("lora")) or None)


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def write(workdir, config, resolved):
  text = json.dumps({"config": json.loads(config.to_json_best_effort()), "resolved": resolved},
                    indent=1)
  atomic.write_text(pathlib.Path(workdir) / FILENAME, text + "\n")


def read(workdir):
  """(config ConfigDict, resolved dict) stored in `workdir`, or None when it has none."""
  path = pathlib.Path(workdir) / FILENAME
  if not path.is_file():
    return None
  try:
    stored = json.loads(path.read_text(encoding="utf-8"))
    return ml_collections.ConfigDict(stored["config"]), stored["resolved"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise SettingsError(f"{path}: not a run-settings file ({type(e).__name__}: {e}).") from e


def check_same(field, stored, given, where):
  """Raises unless `given` is None or equals the value the run was trained with."""
  if given is not None and given != stored:
    raise SettingsError(f"{field}: the run in {where} was trained with {stored!r}, but {given!r} "
                        f"was given; drop the option to use the stored value.")


def _json(value):
  return json.loads(json.dumps(_plain(value), default=str))


def check_config(config, stored_config, resolved, where):
  """Raises unless a training config given on a command line agrees with the stored run."""
  fields = {  # field: (given, stored)
      "config.model_name": (config.model_name, stored_config.model_name),
      "config.model": (_json(config.model), _json(stored_config.model)),
      "config.compute_dtype": (config.get("compute_dtype") or "",
                               stored_config.get("compute_dtype") or ""),
      "config.input.pp_image": (config.input.get("pp_image") or "", resolved["pp_image"]),
      "config.input.text_len": (config.input.text_len, resolved["text_len"]),
      "config.lora": (_json(config.get("lora")) or None, resolved["lora"]),
  }
  for field, (given, stored) in fields.items():
    check_same(field, stored, given, where)
  if config.input.get("class_names"):
    check_same("config.input.class_names", resolved["class_names"],
               sorted(config.input.class_names), where)
  for kind, path in (("tokenizer", config.get("tokenizer")),
                     ("vqvae", seg_codec_lib.npz_path(config.input.get("seg_codec")))):
    entry = resolved.get(kind)
    if entry and path and pathlib.Path(path).is_file():
      stored_file(kind, entry, path, where)


def stored_file(kind, entry, given, where):
  """The file for a stored {path, sha256} entry: `given` if its hash matches, else the
  stored path, else a shipped asset with that hash; an Error names both otherwise."""
  if given is not None:
    digest = sha256(given)
    if digest != entry["sha256"]:
      raise SettingsError(f"{kind} {given} (sha256 {digest[:12]}) is not the file the run in "
                          f"{where} was trained with: {entry['path']} (sha256 {entry['sha256'][:12]}).")
    return pathlib.Path(given)
  candidates = [pathlib.Path(entry["path"]), ASSETS / pathlib.Path(entry["path"]).name]
  for path in candidates:
    if path.is_file() and sha256(path) == entry["sha256"]:
      return path
  raise SettingsError(f"the {kind} the run in {where} was trained with, {entry['path']} "
                      f"(sha256 {entry['sha256'][:12]}), is not there (or changed); pass a copy "
                      f"of it with --{kind}.")
