"""Deterministic train/validation/test split, grouped by title, stratified.

All rows whose normalized title is the same form one *group* and go to one
split (a third of a real catalogue repeats another row's title; splitting
them apart inflates test scores). Groups are stratified by their majority
label: within each label, groups are ordered by a seeded hash and dealt to
the splits by cumulative example count.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping, Sequence

SPLITS = ("train", "validation", "test")


def group_hash(key: str, seed: int) -> int:
  """A stable 64-bit hash (Python's ``hash`` is salted per process)."""
  digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8", "replace"),
                           digest_size=8).digest()
  return int.from_bytes(digest, "little")


def assign_groups(groups: Mapping[int, Mapping[str, int]], *, seed: int,
                  fractions: Sequence[float] = (0.8, 0.1, 0.1)
                  ) -> dict[int, str]:
  """Maps each group (by hash) to a split.

  Args:
    groups: group hash -> {label: rows of that label in the group}.
    seed: the split seed (also mixed into the hashes by the caller).
    fractions: train, validation, test shares (normalized to sum 1).

  Returns:
    group hash -> split name.
  """
  total = float(sum(fractions))
  if total <= 0 or any(f < 0 for f in fractions) or len(fractions) != 3:
    raise ValueError(f"bad split fractions {fractions}")
  bounds = (fractions[0] / total, (fractions[0] + fractions[1]) / total)
  strata: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
  for g, labels in groups.items():
    # Majority label; ties broken by name so the result is deterministic.
    label = min(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    strata[label].append((g, sum(labels.values())))
  out: dict[int, str] = {}
  for label in sorted(strata):
    members = sorted(strata[label],
                     key=lambda gs: group_hash(str(gs[0]), seed))
    n = sum(size for _, size in members)
    seen = 0
    for g, size in members:
      middle = (seen + size / 2) / n
      out[g] = (SPLITS[0] if middle < bounds[0] else
                SPLITS[1] if middle < bounds[1] else SPLITS[2])
      seen += size
  return out
