"""data_prep on Apache Beam (--engine=beam): the same output as the pool.

The recorded digests of the pool path (data_prep/testdata/digests/) are the
reference: the Beam pipeline on the DirectRunner with 2 worker processes
must write the same examples, rejections and repairs.
"""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import apache_beam  # noqa: F401  (a declared dependency: fail, not skip)
import pytest

from data_prep import beam_pipeline
from data_prep import digest as digest_lib
from data_prep import prepare
from mic_jax.data import demo
import test_recorded_digests

WORDS = ["red", "blue", "shirt", "shoe", "watch", "bag", "cotton", "item"]


@pytest.mark.parametrize("name", ["demo-split", "demo-nosplit"])
def test_beam_matches_the_recorded_demo_digest(name, tmp_path):
  rec, found = test_recorded_digests.prepare_and_digest(
      name, tmp_path, ("--engine=beam", "--num_workers=2"))
  diff = digest_lib.differences(rec["digest"], found)
  assert not diff, "\n".join(diff)
  assert not (tmp_path / "out" / prepare.WORK).exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_beam_matches_the_recorded_hm_digest(tmp_path):
  rec, found = test_recorded_digests.prepare_and_digest(
      "hm-nosplit", tmp_path, ("--engine=beam", "--num_workers=2"))
  diff = digest_lib.differences(rec["digest"], found)
  assert not diff, "\n".join(diff)


def _catalogue(root: pathlib.Path) -> pathlib.Path:
  """Rows of every kind pass 1 and 2 reject or repair, with parents."""
  tok = demo.write_tokenizer(root / "tok", WORDS)
  rows = []
  for i in range(60):
    label = ["shirt", "shoe", "bag"][i % 3]
    # Repeated titles: groups of several rows that must share a split.
    rows.append([f"p{i}", f"{label} item {i // 4}", label, "wear"])
  rows += [["p3", "duplicate of an earlier id", "shirt", "wear"],
           ["", "no id", "shirt", "wear"],
           ["e1", "   ", "shoe", "wear"],
           ["e2", "no label", "", "wear"],
           ["r1", "a watch", "watch", "time"],  # Rare: one row.
           ["e1", "first valid row of an id rejected before", "shoe", "wear"],
           ["long", "red " * 400, "bag", "wear"]]
  path = root / "catalogue.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "name", "category", "group"])
    w.writerows(rows)
  return path


def _argv(root, path, out, engine):
  return ["--input", str(path), "--id_column=id", "--title_column=name",
          "--label_column=category", "--parent_columns=group",
          "--tokenizer", str(root / "tok"), "--max_length=8",
          "--max_title_chars=100", "--examples_per_shard=7",
          "--output_dir", str(out), "--num_workers=1", f"--engine={engine}"]


def _rejected(out: pathlib.Path) -> list[str]:
  return sorted((out / "rejected.jsonl").read_text(
      encoding="utf-8").splitlines())


def test_beam_equals_the_pool_on_rejected_and_repaired_rows(tmp_path):
  path = _catalogue(tmp_path)
  outs = {}
  for engine in ("pool", "beam"):
    outs[engine] = tmp_path / engine
    prepare.main(_argv(tmp_path, path, outs[engine], engine))
  pool, beam = (digest_lib.digest(outs[e]) for e in ("pool", "beam"))
  assert not digest_lib.differences(pool, beam)
  assert pool["rejected"] == {"duplicate_id": 1, "empty_title": 1,
                              "missing_id": 1, "missing_label": 1,
                              "rare_class": 1}
  assert pool["repaired"]["title_truncated"] == 1
  assert _rejected(outs["pool"]) == _rejected(outs["beam"])
  infos = [json.loads((outs[e] / "dataset_info.json").read_text())
           for e in ("pool", "beam")]
  # The same shard files (their contents may be dealt otherwise).
  assert ({s: len(v) for s, v in infos[0]["shards"].items()} ==
          {s: len(v) for s, v in infos[1]["shards"].items()})
  assert (json.loads((outs["pool"] / "taxonomy.json").read_text()) ==
          json.loads((outs["beam"] / "taxonomy.json").read_text()))


def test_flags_after_prepare_own_go_to_beam_only(tmp_path):
  with pytest.raises(SystemExit):
    prepare.main(["--input=x.csv", "--output_dir", str(tmp_path / "o"),
                  "--tokenizer=t", "--runner=DirectRunner"])
  args = prepare.build_parser().parse_args(
      ["--input=x.csv", "--output_dir=o", "--tokenizer=t", "--engine=beam",
       "--num_workers=2"])
  args.beam_args = []
  opts = beam_pipeline.options(args).get_all_options()
  assert opts["runner"] == "DirectRunner"
  assert opts["direct_num_workers"] == 2
  assert opts["direct_running_mode"] == "multi_processing"
  args.beam_args = ["--runner=DataflowRunner", "--project=p"]
  opts = beam_pipeline.options(args).get_all_options()
  assert opts["runner"] == "DataflowRunner" and opts["project"] == "p"


def test_a_failed_run_leaves_no_data_set_and_a_rerun_completes(
    tmp_path, monkeypatch):
  path = _catalogue(tmp_path)
  pool = tmp_path / "pool"
  prepare.main(_argv(tmp_path, path, pool, "pool"))
  out = tmp_path / "beam"
  real = beam_pipeline.writer.process_rows
  written = []

  def fail_on_the_third_shard(task, rows, *a, **k):
    written.append(task.output)
    if len(written) >= 3:  # Two shards are complete by now.
      raise RuntimeError("killed")
    return real(task, rows, *a, **k)

  monkeypatch.setattr(beam_pipeline.writer, "process_rows",
                      fail_on_the_third_shard)
  with pytest.raises(Exception, match="killed"):
    prepare.main(_argv(tmp_path, path, out, "beam"))
  assert not (out / "dataset_info.json").exists()
  assert len(list(out.glob("*.tfrecord-*"))) == 2
  monkeypatch.setattr(beam_pipeline.writer, "process_rows", real)
  prepare.main(_argv(tmp_path, path, out, "beam"))
  assert not digest_lib.differences(digest_lib.digest(pool),
                                    digest_lib.digest(out))


def test_sigkill_mid_way_leaves_no_data_set_and_the_rerun_matches(tmp_path):
  """The whole process group (launcher and Beam's workers) is killed once
  the plan is made; the same command then completes with the demo digest."""
  record = json.loads((test_recorded_digests.DIGESTS / "demo-split.json")
                      .read_text(encoding="utf-8"))
  places = {"python": sys.executable, "raw": str(tmp_path / "raw"),
            "out": str(tmp_path / "out")}
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(test_recorded_digests.REPO), os.environ.get("PYTHONPATH", "")])}

  def command(step):
    return [test_recorded_digests._fill(a, places) for a in step]  # pylint: disable=protected-access

  subprocess.run(command(record["setup"]), check=True, env=env,
                 cwd=test_recorded_digests.REPO)
  prepare_cmd = command(record["command"]) + ["--engine=beam",
                                              "--num_workers=2"]
  out = tmp_path / "out"
  proc = subprocess.Popen(prepare_cmd, env=env, start_new_session=True,
                          cwd=test_recorded_digests.REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while (not (out / prepare.WORK / beam_pipeline.PASS1).exists()
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (out / "dataset_info.json").exists()
  subprocess.run(prepare_cmd, check=True, env=env,
                 cwd=test_recorded_digests.REPO, capture_output=True)
  diff = digest_lib.differences(record["digest"], digest_lib.digest(out))
  assert not diff, "\n".join(diff)
