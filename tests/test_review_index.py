"""The review queue's index (issue 32): reused when the score file is
unchanged, built anew when one byte changes, never served half built.

A few hundred products over a fake export; the index is kept in an
``index_dir`` as the program keeps it (beside the review database).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

import review_helpers
from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import store as store_lib
from mic_jax.reviewing import suspects as suspects_lib
from mic_jax.serving import bundle

LABELS = ["bag", "shirt", "shoe", "watch"]
N = 300
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture()
def sample(tmp_path):
  export = review_helpers.fake_export(tmp_path / "export", LABELS)
  identity = bundle.identity(export)
  scores = tmp_path / "scores.jsonl"
  with open(scores, "w") as f:
    for i in range(N):
      p = round((i * 37 % N) / N, 3)
      f.write(json.dumps({
          "id": f"p{i}", "title": f"product {i}", "label": "bag",
          "top_k": [{"label": "shirt", "prob": p},
                    {"label": "bag", "prob": round(1 - p, 3)}],
          "abstain": i % 10 == 0, "export": identity,
          "photo": {"file": f"/photos/{i}.jpg"} if i % 2 else None}) + "\n")
  return {"export": export, "scores": scores, "identity": identity,
          "index_dir": tmp_path / "review.sqlite.queues",
          "store": store_lib.Store(tmp_path / "review.sqlite")}


def _load(s, **kwargs):
  return queue_lib.load(s["scores"], s["export"], index_dir=s["index_dir"],
                        **kwargs)


def _files(directory):
  """The files of ``directory`` but SQLite's own (-wal, -shm)."""
  return sorted(p.name for p in directory.iterdir()
                if not p.name.endswith(("-wal", "-shm")))


def test_an_unchanged_score_file_reuses_its_index(sample):
  s = sample
  first = _load(s)
  assert not first.reused and len(first) == N
  order = [p["id"] for p in first.page(0, N)]
  second = _load(s)
  assert second.reused and second.index == first.index
  assert [p["id"] for p in second.page(0, N)] == order
  assert second.selection == {"queue": "uncertain"}
  assert second.photo_source("p1") == {"file": "/photos/1.jpg"}
  assert second.photo_source("p2") is None
  # Touching the file (same bytes) keeps it; the options that shape the
  # queue do not.
  os.utime(s["scores"], (1, 1))
  assert _load(s).reused
  suspects = _load(s, suspects=suspects_lib.Suspects(max_label_prob=0.5))
  assert not suspects.reused and suspects.index != first.index
  assert suspects.selection["queue"] == suspects_lib.NAME
  assert _load(s, suspects=suspects_lib.Suspects(max_label_prob=0.5)).reused
  for q in (first, second, suspects):
    q.close()


def test_one_changed_byte_builds_a_new_index(sample):
  s = sample
  first = _load(s)
  data = s["scores"].read_bytes()
  at = data.index(b'"product 7"')
  s["scores"].write_bytes(data[:at] + b'"product X"' + data[at + 11:])
  assert s["scores"].stat().st_size == len(data)  # Same size, one byte.
  changed = _load(s)
  assert not changed.reused and changed.index != first.index
  assert changed.get("p7")["title"] == "product X"
  assert first.get("p7")["title"] == "product 7"  # Still served as it was.
  first.close()
  changed.close()


def test_decisions_made_between_two_starts_are_counted(sample):
  s = sample
  store = s["store"]
  queue = _load(s)
  store.decide("p3", "accepted", "bag", reviewer="ann", export="e",
               base_version=0)
  assert queue.progress(store)["decided"] == 1
  queue.close()
  store.decide("p4", "unclear", None, reviewer="ann", export="e",
               base_version=0)  # While no server runs.
  store.decide("p3", "unclear", None, reviewer="ann", export="e",
               base_version=1)
  again = _load(s)
  assert again.reused
  counts = again.progress(store)
  assert counts["decided"] == 2 and counts["states"] == {"unclear": 2}
  # Two servers on one index (and database) count each decision once.
  other = _load(s)
  store.decide("p5", "accepted", "bag", reviewer="ann", export="e",
               base_version=0)
  assert other.progress(store)["decided"] == 3
  assert again.progress(store)["decided"] == 3
  assert again.first_undecided() == other.first_undecided()
  # The index with another review database: its statuses are not kept.
  fresh = store_lib.Store(s["index_dir"].parent / "other.sqlite")
  fresh.decide("p9", "accepted", "bag", reviewer="bo", export="e",
               base_version=0)
  third = _load(s)
  counts = third.progress(fresh)
  assert counts["decided"] == 1 and counts["states"] == {"accepted": 1}
  for q in (again, other, third):
    q.close()


_KILL_MID_BUILD = """
import os, signal, sys
from mic_jax.reviewing import queue as queue_lib
queue_lib._BATCH = 40
real = queue_lib._row_ok
seen = [0]
def row_ok(*args):
  seen[0] += 1
  if seen[0] == 200:  # Rows in the staging file, none ranked yet.
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*args)
queue_lib._row_ok = row_ok
queue_lib.load(sys.argv[1], sys.argv[2], index_dir=sys.argv[3])
"""


def test_a_build_killed_midway_is_never_served_and_is_rebuilt(sample):
  s = sample
  killed = subprocess.run(
      [sys.executable, "-c", _KILL_MID_BUILD, str(s["scores"]),
       str(s["export"]), str(s["index_dir"])], cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
      check=False, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  left = _files(s["index_dir"])
  assert left and all(".building-" in name for name in left), left
  queue = _load(s)
  assert not queue.reused and len(queue) == N
  assert queue.progress(s["store"])["remaining"] == N
  assert _files(s["index_dir"]) == [queue.index.name]  # Leftovers gone.
  queue.close()


@pytest.mark.parametrize("damage", ["truncated", "not_complete", "garbage"])
def test_a_half_written_index_under_its_name_is_rebuilt(sample, damage):
  s = sample
  queue = _load(s)
  index = queue.index
  queue.close()
  if damage == "truncated":
    data = index.read_bytes()
    index.write_bytes(data[:len(data) // 2])
  elif damage == "not_complete":
    import sqlite3  # pylint: disable=g-import-not-at-top
    db = sqlite3.connect(index)
    db.execute("DELETE FROM meta WHERE name = 'complete'")
    db.execute("DELETE FROM products WHERE rank > 100")
    db.commit()
    db.close()
  else:
    index.write_bytes(b"not an index")
  again = _load(s)
  assert not again.reused and len(again) == N
  assert len(again.page(0, 1000)) == N
  assert again.progress(s["store"])["total"] == N
  again.close()


def test_an_index_in_use_is_kept_and_unused_ones_are_pruned(sample):
  s = sample
  served = _load(s)
  others = []
  for i in range(queue_lib.KEEP_INDEXES + 2):
    q = _load(s, suspects=suspects_lib.Suspects(max_label_prob=0.2 + i / 10))
    q.close()
    others.append(q.index)
  names = set(_files(s["index_dir"]))
  assert served.index.name in names  # In use: kept, though the oldest.
  assert others[-1].name in names and others[0].name not in names
  assert len(names) == queue_lib.KEEP_INDEXES + 1
  assert served.page(0, 1)[0]["rank"] == 1
  served.close()


def test_a_product_twice_is_named_by_its_second_line(sample):
  s = sample
  lines = s["scores"].read_text().splitlines(keepends=True)
  lines[40] = lines[7]    # p7 again on line 41...
  lines[250] = lines[3]   # ...and p3 on line 251: line 41 is named.
  s["scores"].write_text("".join(lines))
  with pytest.raises(queue_lib.QueueError,
                     match=r"scores\.jsonl:41: product 'p7' appears twice"):
    _load(s)
  assert not any(s["index_dir"].glob("queue-*.sqlite"))  # Nothing kept.


def _serve_once(s, db, *extra):
  """Starts mic-jax-review on the sample until it answers; returns its
  start-up lines."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import requests  # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "mic_jax.review", f"--db={db}",
       f"--scores={s['scores']}", f"--export={s['export']}",
       f"--port={port}", *extra], cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(600):
      try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        break
      except requests.ConnectionError:
        assert server.poll() is None, server.stdout.read()
        time.sleep(0.1)
  finally:
    server.terminate()
    output, _ = server.communicate(timeout=60)
  return output


def test_the_program_keeps_its_index_beside_the_database(sample):
  s = sample
  db = s["index_dir"].parent / "review.sqlite"
  first = _serve_once(s, db)
  assert f"{N} products" in first and "(built)" in first, first
  second = _serve_once(s, db)
  assert "(reused: the score file is unchanged)" in second, second
  kept = [p for p in _files(s["index_dir"]) if p.endswith(".sqlite")]
  assert len(kept) == 1 and kept[0] in second


_DECIDE_AND_COUNT = """
import sys
from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import store as store_lib
scores, export, index_dir, db, first = sys.argv[1:]
queue = queue_lib.load(scores, export, index_dir=index_dir)
store = store_lib.Store(db, busy_timeout=60)
for i in range(int(first), 120, 2):
  store.decide(f"p{i}", "accepted", "bag", reviewer="ann", export="e",
               base_version=0)
  queue.progress(store)
"""


def test_two_servers_syncing_one_index_at_once_count_each_decision_once(
    sample):
  s = sample
  _load(s).close()  # Built once; both processes reuse it.
  args = [str(s["scores"]), str(s["export"]), str(s["index_dir"]),
          str(s["store"].path)]
  workers = [subprocess.Popen(
      [sys.executable, "-c", _DECIDE_AND_COUNT, *args, str(first)],
      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
      stderr=subprocess.PIPE, text=True) for first in (0, 1)]
  for worker in workers:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
  queue = _load(s)
  assert queue.reused
  counts = queue.progress(s["store"])
  assert counts["decided"] == 120 and counts["states"] == {"accepted": 120}
  assert counts["abstained_decided"] == 12
  assert queue.first_undecided() == queue.page(0, N, undecided=True)[0][
      "rank"]
  assert len(queue.page(0, N, undecided=True)) == N - 120
  queue.close()
