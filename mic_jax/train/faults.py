"""Test-only fault injection at named points of a run (off by default).

``MIC_JAX_FAULT=POINT:N[:ACTION][,POINT:N[:ACTION]...]`` makes the process
act the ``N``-th time (counted from 1, per process) it reaches ``POINT``:

* ``KILL`` (default): ``SIGKILL`` itself, as a crash or an OOM killer would;
* ``TERM``: ``SIGTERM`` itself, as a preemption notice would;
* ``raise``: raise :class:`InjectedFault` (an in-process crash for tests).

Points (see the ``point(...)`` calls), in the order a run meets them:
``before_eval``, ``eval_batch`` (inside an evaluation, after each batch;
also the final report's), ``after_eval`` (metrics logged, best save not
started), ``best_saving`` (the best save started, its write in flight),
``after_step`` (a train step dispatched, nothing logged or saved yet),
``before_state_save`` (every best save durable, the state save not
started), ``state_saving`` (the state save started, its write in flight),
``trained`` (every save committed, final report not started),
``after_results`` (``results.json`` written); and in a frozen image
tower's feature-cache build, ``feature_build_batch`` (after each batch of
rows is written to the temporary build).

Without the variable ``point`` is a dictionary lookup and nothing else. It
exists so the fault-injection tests can kill a run at a precise moment
instead of racing a timer.
"""

from __future__ import annotations

import collections
import os
import signal
import sys

ENV = "MIC_JAX_FAULT"
ACTIONS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "raise": None}


class InjectedFault(RuntimeError):
  """Raised at a fault point whose action is ``raise``."""


_seen: collections.Counter[str] = collections.Counter()


def parse(spec: str) -> dict[str, tuple[int, str]]:
  """``"after_step:3:TERM,eval_batch:2"`` -> ``{point: (count, action)}``."""
  plan = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    parts = item.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(
        parts[1]) < 1 or (len(parts) == 3 and parts[2] not in ACTIONS):
      raise ValueError(f"{ENV}: bad entry {item!r}; expected POINT:N[:ACTION] "
                       f"with N >= 1 and ACTION one of {sorted(ACTIONS)}")
    plan[parts[0]] = (int(parts[1]), parts[2] if len(parts) == 3 else "KILL")
  return plan


def point(name: str) -> None:
  """Marks a named moment of a run; acts if ``MIC_JAX_FAULT`` says so."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  plan = parse(spec)
  if name not in plan:
    return
  _seen[name] += 1
  count, action = plan[name]
  if _seen[name] != count:
    return
  message = f"{ENV}: {action} at {name} #{count}"
  print(message, file=sys.stderr, flush=True)
  if action == "raise":
    raise InjectedFault(message)
  os.kill(os.getpid(), ACTIONS[action])


def reset() -> None:
  """Forgets the counts (in-process tests run several runs in one process)."""
  _seen.clear()
