"""Dynamic batching: concurrent requests share one model call.

A served model answers many small requests at once. Scoring them one by one
wastes the accelerator (or the CPU's vector units): a batch of 16 costs far
less than 16 batches of 1. :class:`DynamicBatcher` queues the encoded
inputs of each request; a single consumer takes the oldest request, keeps
collecting until ``max_batch_size`` products are waiting or ``max_delay_s``
has passed since it took the first, scores the concatenation in one call on
the model thread and hands each request its own rows back.

Requests are encoded (tokenized, photos decoded and checked) *before* they
are queued, so a bad photo fails only its own request, never the batch it
would have joined. While the model is busy, new requests pile up in the
queue and the next batch takes them all; under load the batch size grows
by itself even with ``max_delay_s = 0``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Callable

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class BatchingStats:
  """Counters a health check reports: how well requests are being merged."""
  requests: int = 0
  batches: int = 0
  products: int = 0
  largest_batch: int = 0

  def as_dict(self) -> dict[str, float]:
    mean = self.products / self.batches if self.batches else 0.0
    return {**dataclasses.asdict(self), "mean_batch": round(mean, 3)}


@dataclasses.dataclass
class _Pending:
  arrays: Arrays
  size: int
  future: asyncio.Future


class DynamicBatcher:
  """Merges concurrently submitted inputs into batched calls of ``score``.

  Args:
    score: ``arrays -> probabilities [N, C]`` for a dict of equally long
      arrays (:meth:`mic_jax.serving.Predictor.probabilities_of_arrays`).
      It runs on ``executor``, one call at a time.
    max_batch_size: most products per call. A single request larger than
      this is scored alone, never split.
    max_delay_s: how long the first request of a batch waits for company.
    executor: where ``score`` runs (a one-thread pool keeps calls serial).
  """

  def __init__(self, score: Callable[[Arrays], np.ndarray], *,
               max_batch_size: int, max_delay_s: float,
               executor: concurrent.futures.Executor):
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_delay_s < 0:
      raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
    self._score = score
    self._max_batch_size = max_batch_size
    self._max_delay_s = max_delay_s
    self._executor = executor
    self._queue: asyncio.Queue[_Pending] | None = None
    self._carry: _Pending | None = None  # Taken but did not fit; goes next.
    self._task: asyncio.Task | None = None
    self.stats = BatchingStats()

  def start(self) -> None:
    """Starts the consumer on the running event loop."""
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._consume())

  async def close(self) -> None:
    """Stops the consumer; requests still queued get a ``RuntimeError``."""
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    leftovers = [self._carry] if self._carry else []
    while self._queue is not None and not self._queue.empty():
      leftovers.append(self._queue.get_nowait())
    for item in leftovers:
      if not item.future.done():
        item.future.set_exception(RuntimeError("the server is shutting down"))

  async def submit(self, arrays: Arrays) -> np.ndarray:
    """The probabilities of ``arrays``, scored together with other requests."""
    if self._queue is None:
      raise RuntimeError("DynamicBatcher.start() was not called")
    size = len(arrays["input_ids"])
    future = asyncio.get_running_loop().create_future()
    self.stats.requests += 1
    await self._queue.put(_Pending(arrays, size, future))
    return await future

  async def _next(self, timeout: float | None) -> _Pending | None:
    if self._carry is not None:
      item, self._carry = self._carry, None
      return item
    if timeout is None:
      return await self._queue.get()
    if timeout <= 0:
      return None if self._queue.empty() else self._queue.get_nowait()
    try:
      return await asyncio.wait_for(self._queue.get(), timeout)
    except asyncio.TimeoutError:
      return None

  async def _collect(self) -> list[_Pending]:
    """The oldest request plus whatever joins it within the limits."""
    loop = asyncio.get_running_loop()
    batch = [await self._next(None)]
    total = batch[0].size
    deadline = loop.time() + self._max_delay_s
    while total < self._max_batch_size:
      item = await self._next(deadline - loop.time())
      if item is None:
        break
      if total + item.size > self._max_batch_size:
        self._carry = item  # First in line for the next batch.
        break
      batch.append(item)
      total += item.size
    return [item for item in batch if not item.future.cancelled()]

  async def _consume(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._collect()
      if not batch:
        continue
      merged = {key: np.concatenate([item.arrays[key] for item in batch])
                for key in batch[0].arrays}
      try:
        probs = await loop.run_in_executor(self._executor, self._score,
                                           merged)
      except Exception as e:  # pylint: disable=broad-except
        for item in batch:
          if not item.future.done():
            item.future.set_exception(e)
        continue
      size = sum(item.size for item in batch)
      self.stats.batches += 1
      self.stats.products += size
      self.stats.largest_batch = max(self.stats.largest_batch, size)
      start = 0
      for item in batch:
        if not item.future.done():  # The client may have gone away.
          item.future.set_result(probs[start:start + item.size])
        start += item.size
