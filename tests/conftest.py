"""Shared test fixtures: where ../shared/data is, and skipping cleanly without it; session teardown."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("BVCXR_SHARED_DATA", REPO.parent / "shared" / "data"))
TBX11K_DIR = SHARED_DATA / "tbx11k_tb_subset"
NIH_DIR = SHARED_DATA / "nih_cxr14_nofinding_pa"


@pytest.fixture
def tbx11k_dir():
  if not (TBX11K_DIR / "TBX11K").is_dir():
    pytest.skip(f"real TBX11K subset not found at {TBX11K_DIR}")
  return TBX11K_DIR


@pytest.fixture
def nih_dir():
  if not (NIH_DIR / "manifest.csv").is_file():
    pytest.skip(f"real NIH normals not found at {NIH_DIR}")
  return NIH_DIR


def pytest_sessionfinish(session):
  """Frees the session's arrays and compiled programs before an xdist worker reports that it
  has finished. Otherwise that long collection runs after the report, execnet interrupts the
  worker with SIGINT after 5 s, and the KeyboardInterrupt lands in hypothesis's gc callback
  (a PytestUnraisableExceptionWarning at the end of a full run)."""
  del session
  import gc  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
