"""The "suspected label errors" queue: catalogue products the model
confidently disagrees with.

A marketplace's training labels come from sellers and are sometimes wrong;
a model trained on them still disagrees with a wrong label when the rest of
the catalogue says otherwise. Scoring the train split (``mic-jax-predict
--data_dir=... --split=train``) gives each product its catalogue ``label``
and ``label_prob``, the model's calibrated probability of it. A product is
kept when

* the model's top label is not the catalogue's,
* p(catalogue label) <= ``max_label_prob``, and
* p(top label) >= ``min_top_prob``,

and the kept ones are ranked most suspicious first: by the margin
p(top) - p(catalogue label), largest first (ties in file order). A product
the model is unsure of is not evidence against its label, which is why
both thresholds are there.

A score row without ``label_prob`` (a file scored before it was written)
falls back to the catalogue label's entry in ``top_k``, or, when the label
is outside the top k, to the smallest top-k probability: an upper bound of
p(catalogue label), so the margin is a lower bound: such a product is
never ranked more suspicious than it is (and may be left out; score the
split again to have ``label_prob``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

NAME = "suspected_label_errors"


class SuspectsError(ValueError):
  """A score row cannot be judged; the message says why (the caller adds
  ``FILE:LINE``)."""


@dataclasses.dataclass(frozen=True)
class Suspects:
  """The thresholds of the queue (see the module doc)."""
  max_label_prob: float = 0.1
  min_top_prob: float = 0.5

  def __post_init__(self):
    for name in ("max_label_prob", "min_top_prob"):
      value = getattr(self, name)
      if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got "
                         f"{value!r}")

  def margin(self, row: dict[str, Any], known: set[str]) -> float | None:
    """p(top) - p(catalogue label) when ``row`` is a suspected label error,
    else None. ``top_k`` is checked already; raises :class:`SuspectsError`
    for a row without a usable catalogue label."""
    label = row.get("label")
    if not isinstance(label, str) or not label:
      raise SuspectsError(
          "no catalogue 'label': the suspected_label_errors queue needs "
          "the scores of a prepared split (mic-jax-predict --data_dir=... "
          "--split=train), whose rows carry it")
    if label not in known:
      raise SuspectsError(f"catalogue label {label!r} is not the export's")
    label_prob = catalogue_prob(row)
    top = row["top_k"][0]
    if (top["label"] == label or label_prob > self.max_label_prob
        or top["prob"] < self.min_top_prob):
      return None
    return top["prob"] - label_prob

  def describe(self) -> str:
    """What is kept, in words (the start-up line and the page)."""
    return (f"the model's top label is not the catalogue's, p(top) >= "
            f"{self.min_top_prob:g} and p(catalogue label) <= "
            f"{self.max_label_prob:g}; most suspicious first "
            "(p(top) - p(catalogue label))")


def catalogue_prob(row: dict[str, Any]) -> float:
  """The model's probability of the row's catalogue label: ``label_prob``,
  else its top-k entry, else the smallest top-k probability (a bound)."""
  if "label_prob" in row:
    prob = row["label_prob"]
    if (not isinstance(prob, (int, float)) or isinstance(prob, bool)
        or not 0 <= prob <= 1):
      raise SuspectsError(f"'label_prob' is {prob!r:.40}, not a number in "
                          "[0, 1]")
    return float(prob)
  for entry in row["top_k"]:
    if entry["label"] == row["label"]:
      return float(entry["prob"])
  return float(min(e["prob"] for e in row["top_k"]))
