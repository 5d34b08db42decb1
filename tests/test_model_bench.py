"""bench.model_bench's decode-step profile on the tiny model (no HF needed)."""
import pytest

from bench import model_bench
from big_vision_cxr.models import paligemma as pg


def test_profile_step_sums_the_decode_loop():
  cfg = pg.get_config("tiny")
  model = pg.Model(**cfg)
  ours = model_bench.Ours(model, model_bench.random_params(model, cfg.img.image_size), steps=5)
  images, text = model_bench.inputs(2, cfg.img.image_size)
  ours.generate(images, text, 5)  # Compiled before the trace.
  rows = model_bench.profile_step(ours, images, text, top=3)
  ops, other, whole = rows[:-2], rows[-2], rows[-1]
  assert len(ops) == 3 and all(r["hlo_shape"].startswith(("f32[", "s32[", "pred[")) for r in ops)
  times = [r["ms_per_step"] for r in ops]
  assert times == sorted(times, reverse=True) and times[-1] > 0
  assert whole["ms_per_step"] == pytest.approx(sum(times) + other["ms_per_step"])
  assert other["op"].startswith("the other ") and int(other["op"].split()[2]) > 10
