"""What a person sees on the terminal, and where everything else goes.

Every program (prepare, train, export, predict, serve, reproduce) opens one
:func:`session` right after reading its flags. Inside it:

* the console shows only the lines written with :func:`say` and
  :func:`table` (a start summary, progress, evaluation lines, the results
  and the paths written) and errors (tracebacks, ``error: ...`` messages,
  exit messages), which Python writes to ``sys.stderr``;
* everything else goes to a log file in the output directory: the Python
  logging of every library (absl, Orbax, JAX, TensorFlow) and our own
  detail (the parameter/sharding table), Python warnings, and whatever
  native code (TensorFlow, XLA) writes to file descriptor 2;
* with ``verbose`` nothing is redirected: the console shows all of it as
  before, and the log file still receives the Python logging.

Outside a session (tests, notebooks) :func:`say` is an ordinary INFO log
record, so library code calls it unconditionally. A session inside a
session (the demo data preparation inside a training run) changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import sys
import time
from typing import Any, Iterator, Sequence, TextIO

CONSOLE_LOGGER = "mic_jax.console"
# Programs without an output directory (predict one product, serve) log here.
LOG_DIR_ENV = "MIC_JAX_LOG_DIR"
VERBOSE_HELP = ("Show every library's log lines on the console too (they "
                "always go to the log file).")
_FILE_FORMAT = ("%(levelname).1s%(asctime)s %(process)d %(name)s "
                "%(filename)s:%(lineno)d] %(message)s")

_logger = logging.getLogger(CONSOLE_LOGGER)
_logger.setLevel(logging.INFO)
# The session's own records (start, stop) go to the log file only.
_session_logger = logging.getLogger("mic_jax.session")


@dataclasses.dataclass(frozen=True)
class Session:
  """An open console session: where the detail goes."""
  program: str
  log_path: pathlib.Path
  verbose: bool


_active: list[Session] = []


def say(message: str = "", *args: Any) -> None:
  """One line for the person at the console (and the log file)."""
  _logger.info(message, *args)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """A small aligned table on the console, one :func:`say` per line."""
  for line in format_table(header, rows):
    say("%s", line)


def results_table(per_split: dict[str, Any]) -> None:
  """The results of a run or an export, one row per split present."""
  rows = []
  for split in ("validation", "test"):
    r = per_split.get(split)
    if r:
      top5 = r.get("top5_accuracy")
      rows.append([split, f"{r['macro_f1']:.4f}", f"{r['accuracy']:.4f}",
                   "" if top5 is None else f"{top5:.4f}",
                   f"{int(r.get('num_examples', 0)):,}"])
  table(["split", "macro-F1", "accuracy", "top-5", "products"], rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]
                 ) -> list[str]:
  """Lines of a plain-text table: first column left-, others right-aligned."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for row in cells:
    parts = [row[0].ljust(widths[0])] + [
        c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    lines.append("  ".join(parts).rstrip())
  return lines


def count(n: float) -> str:
  """A parameter or example count a person reads at a glance: 1.2M, 45.3k."""
  for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.1f}{unit}"
  return f"{int(n)}"


def active() -> Session | None:
  """The open session, if any."""
  return _active[0] if _active else None


def log_path_for(program: str, output_dir: str | os.PathLike[str] | None
                 ) -> pathlib.Path:
  """``<output_dir>/<program>.log``; without a local output directory,
  ``$MIC_JAX_LOG_DIR`` or ``~/.cache/mic_jax/logs``."""
  if output_dir and "://" not in os.fspath(output_dir):
    directory = pathlib.Path(output_dir)
  else:
    directory = pathlib.Path(os.environ.get(LOG_DIR_ENV) or
                             pathlib.Path.home() / ".cache" / "mic_jax" /
                             "logs")
  return directory / f"{program}.log"


class _NotConsole(logging.Filter):
  """Keeps console lines out of a handler that would print them twice."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.name != CONSOLE_LOGGER


@contextlib.contextmanager
def session(program: str, output_dir: str | os.PathLike[str] | None, *,
            verbose: bool = False, stream: TextIO | None = None,
            log_name: str | None = None) -> Iterator[Session]:
  """Routes logging for the duration of one program run (see module doc).

  ``stream`` is where console lines go (default ``sys.stdout``; programs
  whose stdout is data, such as ``predict``, pass ``sys.stderr``).
  ``log_name`` replaces ``<program>.log`` as the file name. Everything is
  restored on exit, so a program's ``main`` can run inside another process
  (a test) and leave it as it was.
  """
  if _active:  # Nested: the outer session already routes everything.
    yield _active[0]
    return
  path = log_path_for(program, output_dir)
  if log_name:
    path = path.with_name(log_name)
  path.parent.mkdir(parents=True, exist_ok=True)
  current = Session(program, path, verbose)
  console_stream = stream if stream is not None else sys.stdout

  root = logging.getLogger()
  saved_root = (list(root.handlers), root.level)
  saved_console = (list(_logger.handlers), _logger.propagate)
  file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
  file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
  console_handler = logging.StreamHandler(console_stream)
  console_handler.setFormatter(logging.Formatter("%(message)s"))
  if verbose:
    shown = list(root.handlers) or [logging.StreamHandler(sys.stderr)]
    for handler in shown:
      if handler.formatter is None:
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
      handler.addFilter(_NOT_CONSOLE)
    root.handlers = shown + [file_handler]
  else:
    root.handlers = [file_handler]
  root.setLevel(min(saved_root[1] or logging.INFO, logging.INFO))
  _logger.handlers = [console_handler]
  _logger.propagate = True
  logging.captureWarnings(True)

  saved_stderr = sys.stderr
  console_fd = None
  if not verbose:
    # Native code (TensorFlow, XLA) writes to fd 2: point it at the log
    # file, and give Python's sys.stderr (tracebacks, error messages) a
    # copy of the console's descriptor.
    for s in (sys.stdout, sys.stderr, sys.__stderr__):
      with contextlib.suppress(Exception):
        s.flush()
    console_fd = os.dup(2)
    os.dup2(file_handler.stream.fileno(), 2)
    sys.stderr = io.TextIOWrapper(
        os.fdopen(os.dup(console_fd), "wb", buffering=0),
        encoding=getattr(saved_stderr, "encoding", None) or "utf-8",
        errors="backslashreplace", line_buffering=True, write_through=True)
    if console_stream is saved_stderr:
      console_handler.setStream(sys.stderr)
  _active.append(current)
  _session_logger.info(
      "=== %s started %s (pid %d): %s", program,
      time.strftime("%Y-%m-%d %H:%M:%S"), os.getpid(), " ".join(sys.argv))
  try:
    yield current
  except SystemExit as e:
    if e.code not in (None, 0):  # The message was printed; note the stop.
      _session_logger.error("%s stopped: %s", program, e.code)
    raise
  except BaseException:
    # The full record stays in the file; Python prints it to the console.
    _session_logger.error("%s stopped", program, exc_info=True)
    raise
  finally:
    _active.remove(current)
    logging.captureWarnings(False)
    for s in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        s.flush()
    if console_fd is not None:
      replaced, sys.stderr = sys.stderr, saved_stderr
      os.dup2(console_fd, 2)
      os.close(console_fd)
      with contextlib.suppress(Exception):
        replaced.close()
    root.handlers, level = saved_root
    root.setLevel(level)
    _logger.handlers, _logger.propagate = saved_console
    for handler in root.handlers:
      handler.removeFilter(_NOT_CONSOLE)
    file_handler.close()


_NOT_CONSOLE = _NotConsole()


def define_verbose_flag() -> None:
  """``--verbose`` for an absl program (once, however many are imported)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


def verbose_requested() -> bool:
  """``--verbose``, or absl's ``-v 1`` (or more), of a parsed absl program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  return bool(values["verbose"].value if "verbose" in values else False) or \
      int(values["verbosity"].value or 0) >= 1
