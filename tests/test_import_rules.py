"""The package's structure rules (issue 14), checked on the source.

Every module of ``mic_jax`` is parsed (nothing is imported or run) and its
imports are collected, the lazy ones inside functions included. The rules:

* no mic_jax module imports ``data_prep`` (preparation sits above the
  library: it imports mic_jax, never the other way round);
* nothing in ``mic_jax/models`` imports ``mic_jax.checkpoints`` (the
  loaders build on the models; architectures are resolved before building);
* ``mic_jax/serving`` reaches no training, export, preparation or flax
  code, directly or through the mic_jax modules it imports;
* the module-level imports among mic_jax modules form no cycle;
* library modules import no program;
* no module defines command-line flags on import: programs define theirs
  when they run, so importing two programs (``main`` and ``estimate`` both
  have ``--config``) never defines a flag twice. One test imports every
  program in one process to prove it.

The packages by job (issue 34), read from every import, the lazy ones in
functions included. A package is a sub-package of ``mic_jax``
(``mic_jax/train/``) or a top-level module (``mic_jax/trainer.py``), which
counts as its own:

* every package has a place in :data:`LAYERS`, the architecture from the
  bottom up, and imports only packages of lower layers;
* no package imports a package that imports it;
* no two files import each other;
* no package holds more than 15% of the lines of ``mic_jax``'s code.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import mic_jax

ROOT = pathlib.Path(mic_jax.__file__).parent
# Programs: a thin main each (flags, then one call); everything else is
# library code.
PROGRAMS = {"mic_jax.main", "mic_jax.predict", "mic_jax.serve",
            "mic_jax.reproduce", "mic_jax.export", "mic_jax.review"}
PROGRAM_PACKAGES = ("mic_jax.tools.",)
FLAG_MODULES = ("flags", "config_flags", "absl.flags",
                "ml_collections.config_flags")


def _module_name(path: pathlib.Path) -> str:
  parts = ("mic_jax",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
          for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def is_program(name: str) -> bool:
  return name in PROGRAMS or name.startswith(PROGRAM_PACKAGES)


def _resolve(name: str, node: ast.ImportFrom) -> str:
  """The absolute module of a (possibly relative) ``from`` import."""
  if not node.level:
    return node.module or ""
  package = name.split(".")
  if name not in MODULES or not (ROOT / "/".join(package[1:]) /
                                 "__init__.py").exists():
    package = package[:-1]
  base = package[:len(package) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, tree: ast.Module, *, module_level_only: bool = False
            ) -> set[str]:
  """Every module ``name`` imports (``from pkg import mod`` gives
  ``pkg.mod`` when that is a module of the package, else ``pkg``)."""
  nodes = tree.body if module_level_only else ast.walk(tree)
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      module = _resolve(name, node)
      for alias in node.names:
        candidate = f"{module}.{alias.name}"
        found.add(candidate if candidate in MODULES else module)
  return found


def _top(module: str, prefixes: tuple[str, ...]) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_package_is_parsed():
  assert {"mic_jax.trainer", "mic_jax.serving.predictor",
          "mic_jax.models.classifier", "mic_jax.export"} <= set(MODULES)


def test_no_mic_jax_module_imports_data_prep():
  bad = sorted(f"{name} imports {m}" for name, tree in MODULES.items()
               for m in imports(name, tree) if _top(m, ("data_prep",)))
  assert not bad, bad


def test_models_do_not_import_checkpoints():
  bad = sorted(f"{name} imports {m}" for name, tree in MODULES.items()
               if name.startswith("mic_jax.models")
               for m in imports(name, tree)
               if _top(m, ("mic_jax.checkpoints",)))
  assert not bad, bad


def test_serving_reaches_no_training_export_preparation_or_flax_code():
  forbidden = ("mic_jax.train", "mic_jax.trainer", "mic_jax.evaluation",
               "mic_jax.features", "mic_jax.baselines", "mic_jax.analysis",
               "mic_jax.export", "mic_jax.exporter", "data_prep", "flax",
               "mic_jax.models", "mic_jax.layers")
  bad = []
  for start in (n for n in MODULES if n.startswith("mic_jax.serving")):
    seen, todo, via = {start}, [start], {start: start}
    while todo:
      name = todo.pop()
      for m in imports(name, MODULES[name]):
        if _top(m, forbidden):
          bad.append(f"{start} -> ... {name} imports {m}")
        if m in MODULES and m not in seen:
          seen.add(m)
          todo.append(m)
  assert not bad, sorted(set(bad))


def test_no_import_cycle_among_module_level_imports():
  graph = {name: sorted(m for m in imports(name, tree, module_level_only=True)
                        if m in MODULES and m != name)
           for name, tree in MODULES.items()}
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  cycles = []

  def visit(name, path):
    state[name] = 1
    for m in graph[name]:
      if state.get(m) == 1:
        cycles.append(" -> ".join(path[path.index(m):] + [m]))
      elif m not in state:
        visit(m, path + [m])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, cycles


def _import_time_nodes(tree: ast.AST):
  """Every node that runs when the module is imported (function bodies and
  the ``if __name__ == "__main__"`` block are left out: a helper such as
  ``console.define_verbose_flag`` defines a flag only when a program calls
  it)."""
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
      continue  # Runs only as ``python -m``.
    yield child
    yield from _import_time_nodes(child)


def _flag_definitions(tree: ast.Module, at_import: bool = False) -> list[int]:
  nodes = _import_time_nodes(tree) if at_import else ast.walk(tree)
  return [node.lineno for node in nodes
          if isinstance(node, ast.Call) and
          isinstance(node.func, ast.Attribute) and
          node.func.attr.startswith("DEFINE") and
          ast.unparse(node.func.value) in FLAG_MODULES]


def test_library_modules_import_no_program():
  bad = [f"{name} imports the program {m}"
         for name, tree in MODULES.items() if not is_program(name)
         for m in imports(name, tree) if m in MODULES and is_program(m)]
  assert not bad, bad


def test_no_module_defines_flags_on_import():
  """Programs define their flags when they run (``run()``), so any of them
  can be imported beside any other (a notebook, a test, another program)
  without two ``--config`` or ``--workdir`` flags colliding."""
  bad = [f"{name}:{line} defines a flag on import"
         for name, tree in MODULES.items()
         for line in _flag_definitions(tree, at_import=True)]
  assert not bad, bad
  # The rule sees flags where they are: every program defines some.
  assert all(_flag_definitions(MODULES[name]) for name in PROGRAMS)


def test_every_program_imports_beside_the_others():
  names = sorted(n for n in MODULES if is_program(n))
  assert {"mic_jax.main", "mic_jax.tools.estimate"} <= set(names)
  program = (f"import {', '.join(names)}\n"
             "from absl import flags\n"
             "print(sorted(n for n in flags.FLAGS if n in ('config', "
             "'workdir', 'model', 'verbose', 'host_malloc')))")
  out = subprocess.run([sys.executable, "-c", program], check=True,
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("kind", ["text_only", "cross_modal"])
def test_config_fields_the_classifier_reads_are_in_the_schema(kind):
  """text.vocab_size and fusion.head_bias are locked schema fields whose
  defaults keep the model as it was; set, they change it."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from mic_jax.models import classifier  # pylint: disable=g-import-not-at-top
  config = common.make_config(kind, "demo")
  assert config.text.vocab_size == 0 and config.fusion.head_bias is None
  def shapes(config):
    from mic_jax.checkpoints import common as ckpt  # pylint: disable=g-import-not-at-top
    return {k: v.shape for k, v in ckpt.flatten(
        classifier.build(config, 3).abstract_params).items()}

  default = shapes(config)
  assert ("head/output/bias" in default) == (kind != "cross_modal")
  common.override(config, "fusion.head_bias", kind == "cross_modal")
  common.override(config, "text.vocab_size", 77)
  changed = shapes(config)
  assert ("head/output/bias" in changed) == (kind == "cross_modal")
  (words,) = [v for k, v in changed.items() if "word_embeddings" in k]
  assert words[0] == 77


# The architecture, from the bottom up: a package imports only packages of
# lower layers (never one of its own layer, never one above). The run's
# orchestration (``trainer``: train, evaluate, report) sits above the
# packages it drives; programs (flags, then one library call) sit on top.
LAYERS = (
    # Foundations: the console, the host allocator, the layers the networks
    # are built from (attention, dropout, packing, precision, partitioning).
    ("console", "hostmem", "layers"),
    # The networks (towers, fusion, classifier), and the mesh they run on.
    ("models", "sharding"),
    # Pretrained weights into the networks.
    ("checkpoints",),
    # Titles (normalization, tokenizers) and the prepared data set.
    ("text", "data"),
    # The training loop's parts (step, optimizer, checkpoints, faults, run
    # directory); serving an export; batch scoring.
    ("train", "serving", "scoring"),
    # Evaluation of a run (metrics, calibration, reports, plots); the
    # review page's web side.
    ("evaluation", "reviewing"),
    # The photo-feature cache; the export of a trained run.
    ("features", "exporter"),
    # The one loop: builds a run, trains, evaluates, reports.
    ("trainer",),
    # What runs over trained runs: the baselines, the photo analyses.
    ("baselines", "analysis"),
    # Programs: flags, then one library call.
    ("main", "reproduce", "export", "predict", "serve", "review", "tools"),
)
MAX_SHARE = 0.15  # Of mic_jax's code lines, per package.


def package_of(module: str) -> str | None:
  """``mic_jax.train.steps`` -> ``train``; ``mic_jax.trainer`` -> ``trainer``;
  None for ``mic_jax`` itself and for modules outside mic_jax."""
  parts = module.split(".")
  return parts[1] if parts[0] == "mic_jax" and len(parts) > 1 else None


def file_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
  """Module -> the mic_jax modules it imports (lazy imports included)."""
  graph = {}
  for name, tree in modules.items():
    found = set()
    for m in imports(name, tree):
      while m not in modules and "." in m:  # ``pkg.Name`` -> ``pkg``.
        m = m.rsplit(".", 1)[0]
      if m in modules and m != name:
        found.add(m)
    graph[name] = found
  return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """Package -> the other packages its modules import."""
  packages: dict[str, set[str]] = {}
  for name, targets in graph.items():
    if (source := package_of(name)) is None:
      continue
    packages.setdefault(source, set()).update(
        p for p in map(package_of, targets) if p not in (None, source))
  return packages


def mutual(graph: dict[str, set[str]]) -> list[str]:
  """Pairs that import each other (directly), or that sit on one cycle."""
  def reaches(start, goal):
    seen, todo = {start}, [start]
    while todo:
      for m in graph.get(todo.pop(), ()):
        if m == goal:
          return True
        if m not in seen:
          seen.add(m)
          todo.append(m)
    return False
  return sorted(f"{a} <-> {b}" for a in graph for b in graph[a]
                if a < b and reaches(b, a))


def code_lines() -> dict[str, int]:
  """Lines of .py files per package (``mic_jax/__init__.py`` as ``mic_jax``)."""
  lines: dict[str, int] = {}
  for path in ROOT.rglob("*.py"):
    package = package_of(_module_name(path)) or "mic_jax"
    with path.open(encoding="utf-8") as f:
      lines[package] = lines.get(package, 0) + sum(1 for _ in f)
  return lines


FILES = file_graph(MODULES)
PACKAGES = package_graph(FILES)


def test_every_package_has_a_layer():
  layered = [p for layer in LAYERS for p in layer]
  assert len(layered) == len(set(layered)), "a package is in two layers"
  missing = sorted(set(PACKAGES) - set(layered))
  assert not missing, (f"packages not placed in LAYERS: {missing}; add each "
                       "where its imports put it")
  gone = sorted(set(layered) - set(PACKAGES))
  assert not gone, f"LAYERS names packages that do not exist: {gone}"


def test_packages_import_only_lower_layers():
  layer = {p: i for i, names in enumerate(LAYERS) for p in names}
  bad = sorted(f"{source} (layer {layer[source]}) imports {target} "
               f"(layer {layer[target]})"
               for source, targets in PACKAGES.items() if source in layer
               for target in targets
               if target in layer and layer[target] >= layer[source])
  assert not bad, bad


def test_no_package_imports_a_package_that_imports_it():
  assert not mutual(PACKAGES), mutual(PACKAGES)


def test_no_two_files_import_each_other():
  pairs = sorted(f"{a} <-> {b}" for a, targets in FILES.items()
                 for b in targets if a < b and a in FILES[b])
  assert not pairs, pairs


def test_the_checks_see_a_cycle_planted_in_a_copy():
  """The rules above fail when they should: a lazy import from fusion back
  into attention (the pair that once imported each other) is a file cycle,
  and one from train back into the trainer a package cycle."""
  planted = {name: set(targets) for name, targets in FILES.items()}
  planted["mic_jax.layers.attention"].add("mic_jax.models.fusion")
  planted["mic_jax.train.steps"].add("mic_jax.trainer")
  assert "mic_jax.layers.attention <-> mic_jax.models.fusion" in mutual(planted)
  assert "train <-> trainer" in mutual(package_graph(planted))
  tree = ast.parse("def f():\n  from mic_jax.models import fusion\n")
  assert "mic_jax.models.fusion" in imports("mic_jax.layers.attention", tree)


def test_no_package_holds_more_than_15_percent_of_the_code():
  lines = code_lines()
  total = sum(lines.values())
  table = ", ".join(f"{p} {n} ({n / total:.1%})"
                    for p, n in sorted(lines.items(), key=lambda x: -x[1]))
  big = [p for p, n in lines.items() if n > MAX_SHARE * total]
  assert not big, f"over {MAX_SHARE:.0%} of {total} lines: {big}; {table}"


def test_the_review_page_starts_without_jax():
  """The review page reads the bundle's format only: importing it must not
  load JAX (about 2 s of every start; ``mic_jax.serving`` imports its
  predictor lazily)."""
  code = ("import sys; from mic_jax.reviewing import queue, server; "
          "from mic_jax.serving import bundle; "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=ROOT.parent).stdout
  assert out.strip() == "[]", out
