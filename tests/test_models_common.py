"""models/common.py: a model from config.model_name/variant/overrides, remat checks, PG2 softcap."""
import pathlib

import jax.numpy as jnp
import ml_collections
import pytest

from big_vision_cxr import config as config_lib
from big_vision_cxr import registry
from big_vision_cxr.models import common
from big_vision_cxr.models import paligemma as pg

CXR_MIX = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cxr_mix.py"


def _config(**model):
  return ml_collections.ConfigDict(dict(model_name="paligemma", compute_dtype="",
                                        model=dict(dict(variant="tiny", img={}, llm={}), **model)))


def test_model_module_by_name():
  assert common.model_module("paligemma") is pg
  assert common.model_names() == ["paligemma"]
  assert not hasattr(registry, "MODELS")  # The module name is the only lookup.
  for name in ("nope", "vit", "common", "paligemma.Model", ""):
    with pytest.raises(config_lib.ConfigError, match=rf"model_name={name!r} .*known: paligemma\."):
      common.model_module(name)


def test_model_config_and_build_model():
  config = _config(llm=dict(dropout=0.1, remat="dots_saveable"), img=dict(remat=True))
  cfg = common.model_config(config)
  expected = pg.get_config("tiny")
  expected.llm.update(dropout=0.1, remat="dots_saveable")
  expected.img.remat = True
  assert cfg.to_dict() == expected.to_dict()
  assert hash(common.build_model(config)) == hash(pg.Model(**expected))
  config.compute_dtype = "bfloat16"
  cfg = common.model_config(config)
  assert cfg.img.dtype == cfg.llm.dtype == jnp.bfloat16


@pytest.mark.parametrize("value", [None, False, True, "none", "", *common.REMAT_POLICIES])
def test_remat_values_accepted(value):
  common.check_remat("llm", value)
  assert common.remat_policy(value)[0] == (value not in (None, False, "none", ""))


@pytest.mark.parametrize("value", ["dots_saveabel", "save_only_these_names", 1, 0])
def test_unknown_remat_is_a_config_error(value):
  with pytest.raises(config_lib.ConfigError,
                     match=rf"config.model.img.remat={value!r}: use True .*\['nothing_saveable'"):
    common.model_config(_config(img=dict(remat=value)))


@pytest.mark.parametrize("value, per_iteration", [(False, 1), (True, 2), (1, 1), (2, 2)])
def test_scan_unroll_values_accepted(value, per_iteration):
  cfg = common.model_config(_config(llm=dict(scan_unroll=value)))
  assert cfg.llm.scan_unroll is value
  assert common.scan_unroll(value, cfg.llm.depth) == per_iteration


@pytest.mark.parametrize("value", [0, 3, -1, "all", 1.5, None])
def test_bad_scan_unroll_is_a_config_error(value):
  with pytest.raises(config_lib.ConfigError,
                     match=rf"config.model.img.scan_unroll={value!r}: use True \(unroll all 2 "):
    common.model_config(_config(img=dict(scan_unroll=value)))


def test_cxr_mix_pg2_variant_fine_tunes_without_final_softcap():
  assert pg.get_config("pg2_3b_224").llm.final_logits_softcap == 30.0  # The pt models' value.
  config = config_lib.load_config(f"{CXR_MIX}:variant=pg2_3b_224")
  assert config.model.variant == "pg2_3b_224"
  assert common.model_config(config).llm.final_logits_softcap == 0.0
  default = common.model_config(config_lib.load_config(str(CXR_MIX)))  # PG1: no final softcap.
  assert "final_logits_softcap" not in default.llm
  assert config_lib.load_config(f"{CXR_MIX}:variant=pg1_3b_448").model.llm.to_dict() == \
      dict(remat=False, scan_unroll=False)
  with pytest.raises(ValueError, match="exclude each other"):
    config_lib.load_config(f"{CXR_MIX}:demo,variant=pg2_3b_224")
