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


@pytest.fixture(autouse=True)
def _restore_module_state(monkeypatch):
  """configure() records what it did; no test leaves that set."""
  monkeypatch.setattr(hostmem, "_configured", None)


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


def test_auto_without_jax_platforms_follows_the_installed_plugins(
    monkeypatch):
  """The other branch of auto: no JAX_PLATFORMS, a plugin package decides
  (here a module that exists, and one that does not, stand for them)."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(hostmem, "_ACCELERATOR_MODULES", ("json",))
  assert hostmem.accelerator_expected()
  assert hostmem.configure("auto") == (
      "system (an accelerator backend is expected)")
  monkeypatch.setattr(hostmem, "_ACCELERATOR_MODULES",
                      ("no_such_accelerator_plugin_mic_jax",))
  assert not hostmem.accelerator_expected()


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the tuning is for glibc")
def test_auto_tunes_a_cpu_process_without_jax_platforms():
  """auto, JAX_PLATFORMS unset, no accelerator plugin: the allocator is
  tuned (in a fresh process: the settings must precede JAX's threads)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run(
      [sys.executable, "-c", "from mic_jax import hostmem; "
       "print(hostmem.accelerator_expected()); print(hostmem.configure('auto'))"],
      env=env, capture_output=True, text=True, check=True, timeout=120)
  expected, done = out.stdout.strip().splitlines()[-2:]
  if expected == "True":
    pytest.skip("an accelerator plugin is installed here")
  assert done.startswith("tuned (glibc "), done


class _Libc:
  """glibc's two entry points, refusing the settings named ``refuse``."""

  def __init__(self, refuse):
    self.refuse, self.calls = refuse, []
    self.gnu_get_libc_version = lambda: b"2.99"

  def mallopt(self, param, value):
    self.calls.append(param)
    return 0 if param in self.refuse else 1


@pytest.mark.parametrize("refuse,want", [
    ((hostmem._M_MMAP_MAX,),  # pylint: disable=protected-access
     "partly tuned (glibc 2.99: one arena, no trim; refused: no mmap"),
    ((hostmem._M_ARENA_MAX, hostmem._M_MMAP_MAX,  # pylint: disable=protected-access
      hostmem._M_TRIM_THRESHOLD),  # pylint: disable=protected-access
     "system (glibc 2.99 refused mallopt)"),
    ((), "tuned (glibc 2.99: one arena, no mmap, no trim")])
def test_partial_mallopt_failure_reports_what_changed(monkeypatch, refuse,
                                                      want):
  libc = _Libc(refuse)
  monkeypatch.setattr(hostmem, "_glibc", lambda: libc)
  assert hostmem.configure("tuned").startswith(want)
  assert len(libc.calls) == 3  # Every setting was tried.
