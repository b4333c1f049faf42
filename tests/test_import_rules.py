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
  forbidden = ("mic_jax.train", "mic_jax.export", "mic_jax.exporter",
               "data_prep", "flax", "mic_jax.models")
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
