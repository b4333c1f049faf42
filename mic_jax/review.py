r"""A web page where people review the products the model is unsure of.

  mic-jax-review --db=review.sqlite --add-reviewer=alice   # prints a token once
  mic-jax-review --db=review.sqlite --revoke-reviewer=alice  # ends it
  mic-jax-review --scores=scores.jsonl --export=EXPORT --db=review.sqlite \
      [--host=127.0.0.1 --port=8090]
  mic-jax-review --queue=suspected_label_errors --scores=train_scores.jsonl \
      --export=EXPORT --db=review.sqlite [--suspect_max_label_prob=0.1 \
      --suspect_min_top_prob=0.5]
  mic-jax-review --db=review.sqlite --decisions_csv=decisions.csv

The scores come from ``mic-jax-predict --data_dir=... --split=...`` (or a
catalogue file) with the same export. They are streamed once into an
SQLite index kept in ``DB.queues/`` (or ``--queue_index_dir``): a restart
on an unchanged score file reuses it (:mod:`mic_jax.reviewing.queue`). The page shows the products the
model abstained on first, each with its photo, title, top labels and their
taxonomy paths; a reviewer accepts a label, picks another from the label
list, or marks the product unclear. ``--queue=suspected_label_errors`` on
the scores of a prepared split shows instead only the products whose
catalogue label the model confidently disagrees with, most suspicious
first (:mod:`mic_jax.reviewing.suspects`). Decisions go to the SQLite file with
who, when and which export; ``python -m data_prep.prepare ...
--corrections=review.sqlite`` trains on them, adding the reviewed new
products of a scored file with ``--new_products=FILE``
(:mod:`data_prep.new_products`; see :mod:`mic_jax.reviewing.server` for the
API and the token rules).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from mic_jax import console

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines this program's flags (when it runs, never on import)."""
  flags.DEFINE_string("db", None, "The review database (SQLite; created "
                      "when absent).")
  flags.DEFINE_string("scores", None, "Score file (mic-jax-predict batch or "
                      "split mode) to review.")
  flags.DEFINE_string("export", None, "The export that made the scores.")
  flags.DEFINE_enum("queue", "uncertain",
                    ["uncertain", "suspected_label_errors"],
                    "uncertain: every scored product, abstained first, "
                    "least confident first. suspected_label_errors: only the "
                    "products of a scored split whose catalogue label the "
                    "model confidently disagrees with, most suspicious first.")
  flags.DEFINE_float("suspect_max_label_prob", 0.1, "suspected_label_errors: "
                     "keep a product when the model's probability of its "
                     "catalogue label is at most this...")
  flags.DEFINE_float("suspect_min_top_prob", 0.5, "suspected_label_errors: "
                     "...and its top label (not the catalogue's) has at least "
                     "this probability.")
  flags.DEFINE_string("queue_index_dir", None, "Where the queue's index "
                      "(an SQLite file built from --scores) is kept, so a "
                      "start on an unchanged score file reuses it; default: "
                      "DB.queues beside --db.")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
  flags.DEFINE_integer("port", 8090, "Port.")
  flags.DEFINE_integer("max_body_bytes", 16 * 1024,
                       "Largest request body accepted.")
  flags.DEFINE_string("add_reviewer", None, "Create this reviewer, print its "
                      "token once and exit.")
  flags.DEFINE_string("revoke_reviewer", None, "End this reviewer's token "
                      "and signed-in sessions and exit.")
  flags.DEFINE_string("decisions_csv", None, "Write the current decisions "
                      "to this CSV and exit.")
  console.define_verbose_flag()


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from mic_jax.reviewing import store as store_lib
  # pylint: enable=g-import-not-at-top
  try:
    store = store_lib.Store(FLAGS.db)
  except store_lib.StoreError as e:
    raise SystemExit(f"error: {e}") from e
  if FLAGS.add_reviewer is not None:
    try:
      token = store.add_reviewer(FLAGS.add_reviewer)
    except store_lib.StoreError as e:
      raise SystemExit(f"error: {e}") from e
    print(f"reviewer {FLAGS.add_reviewer.strip()} added to {FLAGS.db}; "
          "their token (shown only now, keep it secret):")
    print(token)
    return
  if FLAGS.revoke_reviewer is not None:
    try:
      ended = store.revoke_reviewer(FLAGS.revoke_reviewer.strip())
    except store_lib.StoreError as e:
      raise SystemExit(f"error: {e}") from e
    print(f"reviewer {FLAGS.revoke_reviewer.strip()} revoked in {FLAGS.db}: "
          f"token refused from now on, {ended} signed-in session(s) ended")
    return
  if FLAGS.decisions_csv:
    n = store_lib.write_csv(store, FLAGS.decisions_csv)
    print(f"wrote {n} decisions to {FLAGS.decisions_csv}")
    return
  if not FLAGS.scores or not FLAGS.export:
    raise app.UsageError("give --scores and --export (or --add_reviewer, "
                         "--revoke_reviewer or --decisions_csv)")
  with console.session("review", None, verbose=console.verbose_requested()):
    _serve(store)


def _serve(store) -> None:
  # pylint: disable=g-import-not-at-top
  from aiohttp import web
  from mic_jax.reviewing import queue as queue_lib
  from mic_jax.reviewing import server
  from mic_jax.reviewing import suspects as suspects_lib
  # pylint: enable=g-import-not-at-top
  try:
    suspects = None
    if FLAGS.queue == suspects_lib.NAME:
      suspects = suspects_lib.Suspects(
          max_label_prob=FLAGS.suspect_max_label_prob,
          min_top_prob=FLAGS.suspect_min_top_prob)
    index_dir = FLAGS.queue_index_dir or f"{FLAGS.db}.queues"
    queue = queue_lib.load(FLAGS.scores, FLAGS.export, suspects=suspects,
                           index_dir=index_dir)
  except (queue_lib.QueueError, ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  console.say("%s", summary(queue, store, FLAGS.scores))
  console.say("export   %s (%s...)", FLAGS.export, queue.export[:12])
  console.say("index    %s (%s)", queue.index, "reused: the score file "
              "is unchanged" if queue.reused else "built")
  console.say("serving  http://%s:%d (db %s; log: %s)", FLAGS.host,
              FLAGS.port, FLAGS.db, console.active().log_path)
  web.run_app(server.make_app(queue, store,
                              max_body_bytes=FLAGS.max_body_bytes),
              host=FLAGS.host, port=FLAGS.port, print=None,
              **server.runner_options())


def summary(queue, store, scores: str) -> str:
  """The start-up line: what is to review, and what was left out (rows
  predict could not score are not silently dropped)."""
  counts = queue.progress(store)
  line = (f"review   {scores}: {counts['total']} products "
          f"({counts['abstained']} abstained), {counts['decided']} decided")
  selection = queue.selection
  if "kept" in selection:  # A selection: what it read, kept, and why.
    line = (f"review   {scores}: {selection['queue']}: {selection['kept']} "
            f"of {selection['considered']} products kept "
            f"({selection['description']}), {counts['decided']} decided")
  if queue.skipped_errors:
    line += (f"; {queue.skipped_errors} rows skipped (predict could not "
             "score them: they have 'error')")
  return line


def _underscored(arg: str) -> str:
  """absl spells flags with underscores; --add-reviewer is accepted too."""
  for flag in ("--add-reviewer", "--revoke-reviewer"):
    if arg.startswith(flag):
      return flag.replace("-", "_").replace("__", "--", 1) + arg[len(flag):]
  return arg


def run():
  """Console-script entry point (``mic-jax-review``)."""
  sys.argv = [_underscored(a) for a in sys.argv]
  _define_flags()
  flags.mark_flag_as_required("db")
  app.run(main)


if __name__ == "__main__":
  run()
