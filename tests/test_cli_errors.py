"""Every command line answers bad arguments with one `error:` line on stderr and a non-zero exit."""
import os
import pathlib
import subprocess
import sys


REPO = pathlib.Path(__file__).resolve().parents[1]
MIX = "configs/cxr_mix.py"


def _cases(tmp):
  """(module, argv, what the line must name)."""
  a_file = tmp / "a_file"
  a_file.write_text("x")
  bad_jsonl = tmp / "empty.jsonl"
  bad_jsonl.write_text("")
  return [
      ("big_vision_cxr.train", ["--config", "nope.py"], "nope.py"),
      ("big_vision_cxr.train", ["--config", f"{MIX}:task=bogus"], "task='bogus'"),
      ("big_vision_cxr.train", ["--config", f"{MIX}:demo", "--config.log_training_steps=0"],
       "config.log_training_steps"),
      ("big_vision_cxr.train", ["--config", f"{MIX}:demo", "--config.no_such_field=1"],
       "no_such_field"),
      ("big_vision_cxr.train", ["--config", f"{MIX}:demo", "--workdir", str(a_file)], "a_file"),
      ("big_vision_cxr.train", ["--bogus"], "--config"),
      ("big_vision_cxr.train", ["--config", f"{MIX}:demo", "--bogus"], "--bogus"),
      ("big_vision_cxr.predict", ["--checkpoint", "x"], "--input"),
      ("big_vision_cxr.predict", ["--checkpoint", "nowhere", "--input", str(tmp),
                                  "--out", str(tmp / "o"), "--batch_size", "0"], "--batch_size"),
      ("big_vision_cxr.predict", ["--checkpoint", "nowhere", "--input", str(tmp),
                                  "--out", str(a_file)], "a_file"),
      ("big_vision_cxr.serving", ["--checkpoint", "nowhere.npz", "--out", str(tmp / "hf"),
                                  "--model_variant", "demo"], "nowhere.npz"),
      ("big_vision_cxr.convert", ["bv2hf", "--npz", "missing.npz", "--variant", "demo",
                                  "--out_dir", str(tmp / "hf")], "missing.npz"),
      ("big_vision_cxr.convert", ["export", "--workdir", str(tmp / "none"), "--out",
                                  str(tmp / "m.npz")], "none"),
      ("big_vision_cxr.convert", ["nonsense"], "nonsense"),
      ("big_vision_cxr.train_vqvae", ["--out", str(tmp / "v.npz"), "--lr", "nan"], "--lr"),
      ("big_vision_cxr.train_vqvae", ["--out", str(tmp / "v.npz"), "--steps", "0"], "--steps"),
      ("big_vision_cxr.train_vqvae", ["--out", str(tmp / "v.npz"), "--source", "bogus"],
       "bogus"),
      ("big_vision_cxr.evaluators", ["--type", "diagnosis", "--predictions",
                                     str(tmp / "missing.jsonl")], "missing.jsonl"),
      ("big_vision_cxr.evaluators", ["--type", "diagnosis", "--predictions", str(bad_jsonl)],
       "empty.jsonl"),
      ("big_vision_cxr.evaluate", ["--workdir", str(tmp / "no_run")], "no_run"),
      ("big_vision_cxr.tokenizer", ["train", "--corpus", str(tmp / "no.txt"), "--out",
                                    str(tmp / "t.model")], "no.txt"),
      ("tfds_builders.build", ["--config", "nonesuch"], "nonesuch"),
  ]


def test_each_cli_gives_one_error_line_and_no_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("BVCXR_DEBUG", None)
  failures = []
  for module, argv, named in _cases(tmp_path):
    out = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    if (out.returncode == 0 or len(lines) != 1 or not lines[0].startswith("error: ")
        or named not in lines[0] or "Traceback" in out.stderr):
      failures.append(f"{module} {argv}: rc={out.returncode}\n{out.stderr[-2000:]}")
  assert not failures, "\n\n".join(failures)


def test_debug_shows_the_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-m", "big_vision_cxr.train", "--config", "nope.py",
                        "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: ")
