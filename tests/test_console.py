"""The console a person reads: our lines on the terminal, the rest in a log.

Every program opens one :func:`mic_jax.console.session`; these tests check
the routing itself (in-process), the README's first command as a user runs
it (a subprocess: at most 60 lines, ending with the results table, the
detail in the run's log file), that errors still reach the console, and that
the console scripts of ``pyproject.toml`` name the ``python -m`` functions.
"""

import ast
import io
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib
import warnings

from absl import logging as absl_logging
import pytest

from mic_jax import console

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 60


def _noise():
  """What libraries emit: Python logging, absl, a warning, native fd 2."""
  logging.getLogger("orbax.checkpoint").info("orbax internals")
  absl_logging.info("absl detail")
  warnings.warn("a library warning")
  os.write(2, b"native notice on fd 2\n")


def test_session_sends_library_output_to_the_log_file(tmp_path, capfd):
  stream = io.StringIO()
  with console.session("prog", tmp_path, stream=stream) as session:
    console.say("step %d/%d", 1, 2)
    _noise()
    print("error: shown in full", file=sys.stderr)
  assert session.log_path == tmp_path / "prog.log"
  assert stream.getvalue() == "step 1/2\n"
  log = session.log_path.read_text()
  for text in ("step 1/2", "orbax internals", "absl detail",
               "a library warning", "native notice on fd 2"):
    assert text in log, text
  err = capfd.readouterr().err
  assert "error: shown in full" in err
  assert "native notice" not in err and "orbax" not in err
  os.write(2, b"after the session\n")  # fd 2 is the console again.
  assert "after the session" in capfd.readouterr().err
  assert "after the session" not in session.log_path.read_text()


def test_verbose_shows_everything_and_still_logs(tmp_path, capfd):
  root = logging.getLogger()
  saved = root.handlers
  root.handlers = []  # As in a program: only what the session installs.
  try:
    stream = io.StringIO()
    with console.session("prog", tmp_path, stream=stream,
                         verbose=True) as session:
      console.say("progress")
      _noise()
  finally:
    root.handlers = saved
  err = capfd.readouterr().err
  assert "orbax internals" in err and "native notice on fd 2" in err
  assert "progress" not in err  # Printed once, on the console stream.
  assert stream.getvalue() == "progress\n"
  assert "orbax internals" in session.log_path.read_text()


def test_a_nested_session_changes_nothing(tmp_path):
  stream = io.StringIO()
  with console.session("outer", tmp_path / "a", stream=stream) as outer:
    with console.session("inner", tmp_path / "b") as inner:
      console.say("once")
  assert inner is outer and not (tmp_path / "b").exists()
  assert stream.getvalue() == "once\n"


def test_a_session_restores_logging_after_an_error(tmp_path, capfd):
  root = logging.getLogger()
  before = (list(root.handlers), root.level, sys.stderr)
  with pytest.raises(ValueError, match="bad input"):
    with console.session("prog", tmp_path, stream=io.StringIO()):
      raise ValueError("bad input")
  assert (list(root.handlers), root.level, sys.stderr) == before
  assert console.active() is None
  assert "ValueError: bad input" in (tmp_path / "prog.log").read_text()
  capfd.readouterr()


# Imports every target in one process, forgetting each program's flags
# before the next (two programs may define the same flag name).
_RESOLVE = """
import importlib, json, sys
from absl import flags
found = {}
for target in json.loads(sys.argv[1]):
  module_name, function = target.split(":")
  module = importlib.import_module(module_name)
  found[target] = callable(getattr(module, function, None))
  for name in list(flags.FLAGS):
    if flags.FLAGS.find_module_defining_flag(name) == module_name:
      delattr(flags.FLAGS, name)
print(json.dumps(found))
"""


def test_console_scripts_are_the_python_m_functions():
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())[
      "project"]["scripts"]
  for name in ("prepare", "train", "export", "predict", "serve", "reproduce"):
    assert f"mic-jax-{name}" in scripts, name
  for name, target in scripts.items():
    module_name, function = target.split(":")
    # `python -m module` runs the same function, and only it.
    path = REPO / (module_name.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and
                   "__main__" in ast.unparse(node.test)]
    assert len(main_blocks) == 1, module_name
    calls = [ast.unparse(s.value.func) for s in main_blocks[0].body
             if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    assert calls == [function], (name, calls)
  targets = sorted(set(scripts.values()))
  proc = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(targets)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == {t: True for t in targets}


def _readme_first_command(workdir: pathlib.Path) -> list[str]:
  """The Quick start's training command, with our workdir."""
  readme = (REPO / "README.md").read_text()
  found = re.search(r"(python -m mic_jax\.main --config=\S+ --workdir=)(\S+)",
                    readme)
  assert found, "README lost its first command"
  argv = shlex.split(found.group(1) + str(workdir))
  return [sys.executable] + argv[1:]


def _readme_sample_output() -> list[str]:
  """The Quick start's sample console output, line by line."""
  readme = (REPO / "README.md").read_text()
  found = re.search(r"The console shows what the run is doing.*?```\n(.*?)```",
                    readme, re.S)
  assert found, "README lost its sample output"
  return found.group(1).splitlines()


def _line_kind(line: str) -> str:
  """What a console line is, without its numbers or paths: its first word
  (and for a step line whether it is progress or an evaluation)."""
  words = line.split()
  if words[:1] == ["step"] and len(words) > 2:
    return f"step {words[2]}"
  return words[0] if words else ""


def _follows_sample(sample: list[str], lines: list[str]) -> bool:
  """Whether ``lines`` are ``sample``'s kinds of line in its order, where a
  sample line ``...`` stands for any number of left-out lines."""
  pattern = "".join(r"(?:[^\n]*\n)*?" if l.strip() == "..." else
                    re.escape(_line_kind(l)) + r"\n" for l in sample)
  return re.fullmatch(pattern, "".join(_line_kind(l) + "\n" for l in lines)
                      ) is not None


def _user_env() -> dict[str, str]:
  """The environment of a person's shell: none of conftest's settings."""
  env = dict(os.environ)
  for key in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL"):
    env.pop(key, None)
  return env


def _run(argv, **kwargs) -> tuple[int, list[str]]:
  proc = subprocess.run(argv, cwd=REPO, env=_user_env(), text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=900, **kwargs)
  return proc.returncode, proc.stdout.splitlines()


def _assert_ends_with_results(lines, results):
  header, validation, test = lines[-3:]
  assert header.split() == ["split", "macro-F1", "accuracy", "top-5",
                            "products"], lines[-5:]
  for line, split in ((validation, "validation"), (test, "test")):
    r = results[split]
    assert line.split() == [split, f"{r['macro_f1']:.4f}",
                            f"{r['accuracy']:.4f}",
                            f"{r['top5_accuracy']:.4f}",
                            f"{r['num_examples']:,}"], line


def test_readme_first_command_prints_a_short_console(tmp_path):
  workdir = tmp_path / "demo"
  code, lines = _run(_readme_first_command(workdir))
  output = "\n".join(lines)
  assert code == 0, output[-3000:]
  assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{output}"
  results = json.loads((workdir / "results.json").read_text())
  _assert_ends_with_results(lines, results)
  assert any(l.startswith("model    cross_modal") for l in lines), output
  assert sum(bool(re.match(r"step \d+/300 ", l)) for l in lines) == 15
  assert "orbax" not in output.lower() and " param " not in output
  # What the README shows is what a user sees (numbers and paths aside).
  assert _follows_sample(_readme_sample_output(), lines), output
  log = (workdir / "train.log").read_text()
  # The detail is in the log: the sharding table, Orbax, native notices.
  assert re.search(r"param txt/embeddings/word_embeddings/embedding\s+"
                   r"\(\d+, 32\)", log)
  assert "orbax" in log.lower()
  # Run again: it finds the run finished and reports again, as briefly.
  code, again = _run(_readme_first_command(workdir))
  assert code == 0 and len(again) <= MAX_LINES, "\n".join(again)[-3000:]
  _assert_ends_with_results(again, results)


def test_errors_reach_the_console_in_full(tmp_path):
  code, lines = _run([sys.executable, "-m", "mic_jax.main",
                      "--config=configs/cross_modal.py:small",
                      f"--workdir={tmp_path}"])
  output = "\n".join(lines)
  assert code == 2, output
  assert "error: config.data.dir is empty" in output
  assert "python -m data_prep.prepare" in output  # The whole message.
  assert "config.data.dir is empty" in (tmp_path / "train.log").read_text()
  code, lines = _run([sys.executable, "-m", "mic_jax.main",
                      "--config=configs/cross_modal.py:demo",
                      "--config.optim.lrr=1e-4", f"--workdir={tmp_path}"])
  assert code != 0 and "lrr" in "\n".join(lines)


def test_prepare_prints_a_summary_and_keeps_its_log_on_overwrite(
    tmp_path, capsys):
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
  raw = tmp_path / "raw"
  csv_path = demo.write_catalogue(raw, image_size=32, seed=0,
                                  num_products=120)
  out = tmp_path / "prepared"
  argv = [f"--input={csv_path}", f"--output_dir={out}",
          f"--tokenizer={raw / 'tokenizer'}", "--max_length=16",
          "--image_column=image", "--split_column=split", "--num_workers=1"]
  prepare.main(argv)
  first = capsys.readouterr().out.splitlines()
  stats = json.loads((out / "stats.json").read_text())
  assert first[0].startswith("prepare  ") and len(first) <= 12, first
  assert first[-len(stats["splits"]) - 1].split() == [
      "split", "products", "with", "photo", "classes"]
  assert first[-1].split()[:2] == [
      list(stats["splits"])[-1],
      f"{list(stats['splits'].values())[-1]['examples']:,}"]
  prepare.main(argv + ["--overwrite", "-v"])
  capsys.readouterr()
  log = (out / "prepare.log").read_text()
  assert log.count("=== prepare started") == 2  # Kept by --overwrite.
  assert (out / "dataset_info.json").exists()


def test_a_mistyped_config_is_one_line_and_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  code, lines = _run([sys.executable, "-m", "mic_jax.main",
                      "--config=configs/crossmodal.py:demo",
                      f"--workdir={workdir}"])
  output = "\n".join(lines)
  assert code != 0, output
  assert len(lines) == 1, output
  assert "configs/crossmodal.py" in output
  assert "configs/cross_modal.py" in output  # What exists, to pick from.
  assert "configs/common.py" not in output and "config_config" not in output
  assert not workdir.exists()


def test_predict_logs_where_the_readme_says(tmp_path):
  """``predict`` has no output directory of its own: even in batch mode its
  log goes to $MIC_JAX_LOG_DIR (or ~/.cache/mic_jax/logs), not beside
  --output, as the README says."""
  readme = (REPO / "README.md").read_text()
  assert "`~/.cache/mic_jax/logs/` (or `$MIC_JAX_LOG_DIR`)" in readme
  (tmp_path / "in.csv").write_text("title\nred shirt\n")
  (tmp_path / "out").mkdir()
  env = {**_user_env(), console.LOG_DIR_ENV: str(tmp_path / "logs")}
  proc = subprocess.run(
      [sys.executable, "-m", "mic_jax.predict", f"--model={tmp_path / 'no'}",
       f"--input={tmp_path / 'in.csv'}",
       f"--output={tmp_path / 'out' / 'p.jsonl'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "manifest.json" in proc.stderr, proc.stderr
  assert list((tmp_path / "out").iterdir()) == []
  assert "predict stopped" in (tmp_path / "logs" / "predict.log").read_text()


def test_readme_quick_start_and_serving_say_what_a_user_meets():
  """Fast checks of the README against the code (the full console run is
  compared with the sample in the test above)."""
  readme = (REPO / "README.md").read_text()
  quick = readme.split("## Quick start", 1)[1].split("```", 1)[0]
  # The honest durations: the install and the training, each named.
  assert "one minute" not in quick
  assert re.search(r"install\S* takes \d+(-\d+)? minutes", quick), quick
  assert re.search(r"training about \d+(-\d+)? minutes", quick), quick
  # The demo's preparation runs as a captured subprocess: its "prepared"
  # line never reaches the training console.
  assert not any(_line_kind(l) == "prepared" for l in _readme_sample_output())
  # The serving section shows a request, not only the server command.
  serving = readme.split("## Export and serving", 1)[1].split("\n## ", 1)[0]
  assert re.search(r"curl .*localhost:8080/v1/predict", serving), serving
  assert '"instances"' in serving and '"title"' in serving
