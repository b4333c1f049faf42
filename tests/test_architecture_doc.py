"""``docs/architecture.md`` names code that exists, and every package.

The page is how a newcomer finds where a step lives; a module renamed or
moved without the page following would send them to nothing, and a new
package left off it would be invisible. Both are checked on the text.
"""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SOURCE_DIRS = ("mic_jax", "data_prep")


def _text() -> str:
  return DOC.read_text(encoding="utf-8")


def test_every_named_path_exists():
  paths = set(re.findall(r"\b(?:mic_jax|data_prep|configs|launch|bench)"
                         r"(?:/[\w.]+)*/?", _text()))
  assert paths, "the page names no paths"
  missing = sorted(p for p in paths if not (REPO / p.rstrip("/")).exists())
  assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_named_module_file_exists():
  """Bare module names (``trainer.py``) are files somewhere in the code."""
  files = {p.name for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")}
  named = set(re.findall(r"(?<![/\w])(\w+\.py)\b", _text()))
  assert named, "the page names no modules"
  missing = sorted(named - files)
  assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_package_is_on_the_page():
  text = _text()
  packages = sorted(str(p.parent.relative_to(REPO))
                    for d in SOURCE_DIRS for p in (REPO / d).rglob("__init__.py")
                    if "testdata" not in p.parts)
  unnamed = [p for p in packages if p != "mic_jax" and p not in text]
  assert not unnamed, f"packages missing from docs/architecture.md: {unnamed}"
