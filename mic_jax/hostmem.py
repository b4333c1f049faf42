"""Host memory allocator settings that keep XLA:CPU from page-faulting.

Why this exists: each execution of a compiled XLA:CPU program allocates its
temporary buffer (activations kept for the backward pass, gradients) in one
block, e.g. 723 MiB for the ``text_only:small`` train step, and frees it at
the end. The allocation is made on a PJRT worker thread, so glibc serves it
from a per-thread arena, which cannot hold a block that large and maps it
with ``mmap`` whatever ``M_MMAP_MAX`` says; freeing it unmaps it. Every
step therefore touches ~190,000 fresh 4 KiB pages, each a minor page fault
the kernel must zero: 15-20% of the step's CPU time (``bench/profile_step.py``
measures it, ``bench/README.md`` has the figures).

:func:`configure` asks glibc (``mallopt``) to serve every thread from the
main heap (``M_ARENA_MAX`` 1), never to ``mmap`` (``M_MMAP_MAX`` 0) and
never to give freed memory back to the system (``M_TRIM_THRESHOLD`` -1).
The block is then reused from step to step: no page faults once the heap
has settled, after the first few steps. The price: the process keeps its peak heap
(the memory the step needed anyway) instead of returning it between steps,
and all threads share one arena lock.

It must run before the threads that allocate exist (before JAX creates its
CPU client, before TensorFlow starts its pools): a thread keeps the arena it
first used. Accelerators (TPU, GPU) keep their buffers in device memory, so
``"auto"`` leaves the host allocator alone unless the run is on CPU.
Only glibc (Linux) is changed; elsewhere nothing is done and the reason is
returned. The programs call it first thing; code that calls the trainer
itself should too, and the trainer warns on the CPU when nobody did
(:func:`untuned_warning`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

MODES = ("auto", "tuned", "system")

# What :func:`configure` did in this process (None: it never ran).
_configured: str | None = None

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # glibc: a trim threshold of -1 disables trimming.

# Packages whose presence means JAX will run on an accelerator.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm60_plugin", "jax_rocm7_plugin")


def define_flag() -> None:
  """Defines ``--host_malloc`` (for programs; call it where flags are made)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum(
      "host_malloc", "auto", list(MODES),
      "Host allocator: 'tuned' stops XLA:CPU's per-step page faults "
      "(mic_jax/hostmem.py), 'system' keeps glibc's defaults, 'auto' tunes "
      "when JAX runs on the CPU.")


def flag_value() -> str:
  """The value of ``--host_malloc`` (``"auto"`` if the program has none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return getattr(flags.FLAGS, "host_malloc", "auto")


def accelerator_expected() -> bool:
  """Whether JAX will pick an accelerator (without initialising JAX).

  ``JAX_PLATFORMS`` decides when it is set (its first entry is the default
  backend); otherwise an installed TPU or GPU plugin package does.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return any(importlib.util.find_spec(m) is not None
             for m in _ACCELERATOR_MODULES)


def _glibc() -> ctypes.CDLL | None:
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    libc.mallopt  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def native_thread_count() -> int:
  """Threads of this process, native ones included (Linux; else 1)."""
  try:
    return len(os.listdir("/proc/self/task"))
  except OSError:
    return 1


def configure(mode: str = "auto") -> str:
  """Applies ``mode`` to this process's allocator; returns what was done.

  Args:
    mode: ``"tuned"`` (the settings above), ``"system"`` (leave glibc's
      defaults) or ``"auto"`` (tuned when JAX will run on the CPU).

  Returns:
    A one-line description for the run's log, e.g. ``"tuned (glibc 2.36)"``.

  Raises:
    ValueError: an unknown mode.
  """
  global _configured
  _configured = _apply(mode)
  return _configured


def configured() -> str | None:
  """What :func:`configure` did in this process, or None if it never ran."""
  return _configured


def untuned_warning(backend: str) -> str | None:
  """A warning for a CPU run whose process never chose an allocator.

  Library users who call the trainer themselves (a notebook, their own
  main) skip the programs' ``--host_malloc``; on the CPU that costs the
  page faults described above, and it is too late to fix once JAX runs.
  """
  if backend != "cpu" or _configured is not None:
    return None
  return ("host allocator left at glibc's defaults: XLA:CPU will page-fault "
          "its temporaries every step (15-20% of the step's CPU time). Call "
          "mic_jax.hostmem.configure('auto') before importing JAX, as "
          "python -m mic_jax.main does (see mic_jax/hostmem.py)")


def _apply(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"host allocator mode must be one of {MODES}, got "
                     f"{mode!r}")
  if mode == "system":
    return "system (glibc defaults, as requested)"
  if mode == "auto" and accelerator_expected():
    return "system (an accelerator backend is expected)"
  libc = _glibc()
  if libc is None:
    return "system (not glibc: nothing to tune)"
  # Each setting is tried (no short cut): one refused must not hide the
  # others that took effect.
  settings = (("one arena", _M_ARENA_MAX, 1), ("no mmap", _M_MMAP_MAX, 0),
              ("no trim", _M_TRIM_THRESHOLD, _NEVER_TRIM))
  results = [(name, libc.mallopt(param, value) == 1)
             for name, param, value in settings]
  applied = [name for name, ok in results if ok]
  refused = [name for name, ok in results if not ok]
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  version = libc.gnu_get_libc_version().decode()
  if not applied:
    return f"system (glibc {version} refused mallopt)"
  threads = native_thread_count()
  # Threads started earlier (e.g. numpy's OpenBLAS pool) keep their arenas.
  late = (f"; {threads - 1} earlier thread(s) keep their own arena"
          if threads > 1 else "")
  if refused:
    return (f"partly tuned (glibc {version}: {', '.join(applied)}; refused: "
            f"{', '.join(refused)}{late})")
  return f"tuned (glibc {version}: {', '.join(applied)}{late})"
