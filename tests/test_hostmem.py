"""The host allocator settings (mic_jax.hostmem) remove XLA:CPU's page faults.

Each case runs in a fresh Python process, because the settings must be made
before JAX starts its threads: a jitted function whose temporary buffer is
~64 MiB is called repeatedly, and the process's minor page faults in each
call are counted (``getrusage``). With glibc's defaults every call maps the
buffer afresh and faults on each of its pages; tuned, the buffer is reused.
The typical (median) call is compared: on a loaded host the previous call's
buffer is sometimes freed after the next call has allocated, so the tuned heap
grows by another block now and then (64 MiB faulted in, in 1-2 calls of 21,
with two busy loops beside it); the heap never shrinks, so that cost stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mic_jax import hostmem

_PROGRAM = r"""
import json, resource, sys
from mic_jax import hostmem
done = hostmem.configure(sys.argv[1])
import jax, jax.numpy as jnp

@jax.jit
def step(x):
  # Temporaries of 16 x 1 MiB rows each kept for the reduction: ~64 MiB.
  ys = [jnp.sin(x * i) for i in range(16)]
  return sum(jnp.sum(y * y) for y in ys)

x = jnp.ones((1024, 1024), jnp.float32)
for _ in range(10):  # The heap settles in a few calls.
  step(x).block_until_ready()
faults = []
for _ in range(21):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults,
                  "median_faults": sorted(faults)[len(faults) // 2]}))
"""


def _run(mode: str, platforms: str = "cpu") -> dict:
  env = {**os.environ, "JAX_PLATFORMS": platforms}
  out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], env=env,
                       capture_output=True, text=True, check=True,
                       timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the tuning is for glibc")
def test_tuned_allocator_stops_per_step_page_faults():
  system, tuned = _run("system"), _run("tuned")
  assert system["done"].startswith("system")
  assert tuned["done"].startswith("tuned"), tuned
  # glibc's defaults: the ~64 MiB of temporaries fault in page by page,
  # in every call.
  assert min(system["faults"]) > 5_000, system
  assert tuned["median_faults"] < system["median_faults"] / 20, (system,
                                                                tuned)


def test_auto_leaves_accelerator_runs_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert hostmem.accelerator_expected()
  assert hostmem.configure("auto") == (
      "system (an accelerator backend is expected)")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not hostmem.accelerator_expected()


def test_unknown_mode_is_an_error_naming_the_choices():
  with pytest.raises(ValueError, match="auto.*tuned.*system.*'fast'"):
    hostmem.configure("fast")


def test_a_cpu_run_that_never_chose_an_allocator_is_warned(monkeypatch):
  monkeypatch.setattr(hostmem, "_configured", None)
  assert hostmem.configured() is None
  assert "hostmem.configure('auto')" in hostmem.untuned_warning("cpu")
  assert hostmem.untuned_warning("tpu") is None
  # Any choice, even glibc's defaults on purpose, silences it.
  assert hostmem.configure("system") == hostmem.configured()
  assert hostmem.untuned_warning("cpu") is None
