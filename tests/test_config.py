"""Config loading, overrides with clear errors, validation, and configs/cxr_mix.py."""
import jax
import pytest

from big_vision_cxr import config as config_lib
from big_vision_cxr import optim
from big_vision_cxr import param_paths
from big_vision_cxr.data import prompts
from big_vision_cxr.models import paligemma

import _trainer_testlib as lib

MIX = str(lib.REPO / "configs" / "cxr_mix.py")


def test_parse_arg_typed_words_and_errors():
  arg = config_lib.parse_arg("task=vqa,demo,steps=12", task="", demo=False, steps=5)
  assert (arg.task, arg.demo, arg.steps) == ("vqa", True, 12)
  with pytest.raises(config_lib.ConfigError, match=r"config arg 'tsk' .* unknown"):
    config_lib.parse_arg("tsk=vqa", task="")
  with pytest.raises(config_lib.ConfigError, match="config arg steps='x': expected an int"):
    config_lib.parse_arg("steps=x", steps=5)


def test_overrides_are_typed_and_unknown_or_ill_typed_fields_are_named(tmp_path):
  config, workdir = config_lib.parse_flags(
      ["--config", f"{MIX}:demo", "--workdir", str(tmp_path), "--config.lr=0.01",
       "--config.total_steps", "7", "--config.input.batch_size=16", "--config.resume=False",
       "--config.input.tasks=('vqa',)"])
  assert workdir == str(tmp_path)
  assert (config.lr, config.total_steps, config.input.batch_size, config.resume) == (
      0.01, 7, 16, False)
  assert tuple(config.input.tasks) == ("vqa",)
  with pytest.raises(config_lib.ConfigError, match=r"--config.input.batch_sise: unknown field"):
    config_lib.apply_override(config, "input.batch_sise", "8")
  with pytest.raises(config_lib.ConfigError, match=r"unknown field config.inputs"):
    config_lib.apply_override(config, "inputs.batch_size", "8")
  with pytest.raises(config_lib.ConfigError,
                     match=r"--config.input.batch_size='eight': expected an int"):
    config_lib.apply_override(config, "input.batch_size", "eight")
  with pytest.raises(config_lib.ConfigError, match=r"--config.resume='maybe': expected a bool"):
    config_lib.apply_override(config, "resume", "maybe")
  config_lib.apply_override(config, "lr", "1")  # an int for a float field is fine
  assert config.lr == 1.0 and isinstance(config.lr, float)
  with pytest.raises(config_lib.ConfigError, match="unknown command-line argument '--lr=3'"):
    config_lib.parse_flags(["--config", MIX, "--lr=3"])
  with pytest.raises(config_lib.ConfigError, match="no_such.py does not exist"):
    config_lib.parse_flags(["--config", str(tmp_path / "no_such.py")])


def test_validation_messages():
  config = config_lib.load_config(f"{MIX}:demo")
  config_lib.validate(config)
  config.total_epochs = 3
  with pytest.raises(config_lib.ConfigError, match=r"exactly one of .*got \['total_steps', "
                                                   r"'total_epochs'\]"):
    config_lib.validate(config)
  config.total_epochs = 0
  config.evals.vqa.type = "vqa2"
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.vqa.type: Unknown evaluator 'vqa2'"):
    config_lib.validate(config)
  config.evals.vqa.type = "vqa"
  config.loc_label_smoothing = dict(sigma=2.0)
  with pytest.raises(config_lib.ConfigError, match=r"loc_label_smoothing must be dict\(sigma_bins"):
    config_lib.validate(config)
  config.loc_label_smoothing = dict(sigma_bins=-1.0)
  with pytest.raises(config_lib.ConfigError, match="S >= 0"):
    config_lib.validate(config)
  config.loc_label_smoothing = dict(sigma_bins=8.0)
  config_lib.validate(config)
  config.input.pp_image = "decode|resise(64)"
  with pytest.raises(config_lib.ConfigError, match="Unknown preprocessing op 'resise'"):
    config_lib.validate(config)
  paper = config_lib.load_config(MIX)
  paper.tokenizer = str(lib.REPO / "big_vision_cxr" / "assets" / "cxr_demo_spm.model")
  paper.model_init = "/nonexistent/paligemma-3b-pt-224.npz"
  with pytest.raises(config_lib.ConfigError, match=r"model_init='/nonexistent/paligemma-3b-pt-224"
                                                   r".npz': file not found.*BVCXR_MODEL_INIT"):
    config_lib.validate(paper)


def test_paper_recipe_freezes_image_side_and_trains_the_llm_of_pg1_3b():
  config = config_lib.load_config(MIX)
  assert config.model.variant == "pg1_3b_224"
  assert tuple(config.input.tasks) == prompts.TASKS
  assert (config.input.weights, config.input.mix_by) == ("inverse_size", "task")
  assert (config.optax_name, config.grad_clip_norm) == ("scale_by_adam", 1.0)
  shapes = paligemma.param_shapes(paligemma.get_config("pg1_3b_224"))
  plan = optim.plan_params(config, shapes)
  names = [n for n, _ in param_paths.tree_names(shapes)]
  assert "img/head/kernel" in names
  trained = sum(leaf.size for n, leaf in param_paths.tree_names(shapes) if plan.trainable(n))
  frozen = sum(leaf.size for n, leaf in param_paths.tree_names(shapes) if not plan.trainable(n))
  assert all(plan.trainable(n) == n.startswith("llm/") for n in names)
  assert 2.4e9 < trained < 2.6e9 and 4.0e8 < frozen < 4.4e8, (trained, frozen)  # Gemma 2B, SigLIP
  fn = optim.make_schedules(config, total_steps=1000)[1]
  assert float(fn(25)) == pytest.approx(0.5) and float(fn(1000)) == pytest.approx(0.0, abs=1e-6)


def test_task_and_lora_variants():
  one = config_lib.load_config(f"{MIX}:task=detection")
  assert tuple(one.input.tasks) == ("detection",) and list(one.evals) == ["detection"]
  assert one.schedule == config_lib.load_config(MIX).schedule  # same recipe
  lora = config_lib.load_config(f"{MIX}:lora")
  shapes = jax.eval_shape(lambda: {"llm": {"layers": {"attn": {"q_einsum": {"w": jax.numpy.zeros(
      (2, 4, 8, 3))}}}}, "img": {"head": {"kernel": jax.numpy.zeros((4, 8))}}})
  lora_shapes = jax.eval_shape(lambda: optim.lora_init(lora.lora, shapes, jax.random.key(0)))
  plan = optim.plan_params(lora, dict(shapes, lora=lora_shapes))
  assert plan.trainable("lora/llm~layers~attn~q_einsum~w/a")
  assert not plan.trainable("llm/layers/attn/q_einsum/w")
  with pytest.raises(ValueError, match="task='xray' is not one of"):
    config_lib.load_config(f"{MIX}:task=xray")
