"""bench.common.interleaved: the sides in turn, warm-ups untimed, the pause outside the times."""
import time

from bench import common


def test_interleaved_takes_turns_and_leaves_the_pause_out():
  calls = []
  fns = [lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.02))]
  t_a, t_b = common.interleaved(fns, repeats=3, warmup=2, pause=0.3)
  assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
  assert t_a < 0.15  # The 0.3 s pauses are not in anyone's time,
  assert 0.02 <= t_b < 0.15  # only each call's own.
