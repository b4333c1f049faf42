"""DynamicBatcher: merged calls give every request exactly its own rows.

The scorer here is a real row-wise function of the inputs (not the model:
the model's part is covered by the served-export test in test_export.py),
so a mix-up of rows between requests changes the answers and fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
import pytest

from mic_jax.serving import batching


def _arrays(seed: int, size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(0, 100, (size, 6)).astype(np.int32),
          "image_present": rng.integers(0, 2, (size,)).astype(np.int32)}


class RowScorer:
  """Softmax over a per-row function of the inputs; records call sizes."""

  def __init__(self, fail_when=None):
    self.calls: list[int] = []
    self.fail_when = fail_when

  def __call__(self, arrays):
    n = len(arrays["input_ids"])
    self.calls.append(n)
    if self.fail_when is not None and self.fail_when(arrays):
      raise RuntimeError("scoring failed")
    logits = (arrays["input_ids"][:, :3] * 0.1
              + arrays["image_present"][:, None]).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


async def _serve(scorer, requests, *, max_batch_size, max_delay_s):
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    batcher = batching.DynamicBatcher(scorer, max_batch_size=max_batch_size,
                                      max_delay_s=max_delay_s, executor=pool)
    batcher.start()
    try:
      answers = await asyncio.gather(
          *(batcher.submit(a) for a in requests), return_exceptions=True)
    finally:
      await batcher.close()
    return answers, batcher.stats


@pytest.mark.parametrize("max_delay_s", [0.0, 0.05])
def test_concurrent_requests_are_merged_and_get_their_own_rows(max_delay_s):
  sizes = [1, 3, 2, 5, 1, 4, 1, 2, 9, 1]  # 9 > max_batch_size: scored alone.
  requests = [_arrays(i, n) for i, n in enumerate(sizes)]
  scorer = RowScorer()
  answers, stats = asyncio.run(_serve(scorer, requests, max_batch_size=8,
                                      max_delay_s=max_delay_s))
  for request, answer in zip(requests, answers):
    np.testing.assert_array_equal(answer, RowScorer()(request))
  assert sum(scorer.calls) == sum(sizes)
  assert all(n <= 8 for n in scorer.calls if n != 9)
  assert len(scorer.calls) < len(sizes)  # Requests really were merged.
  assert stats.requests == len(sizes) and stats.batches == len(scorer.calls)
  assert stats.largest_batch == max(scorer.calls)


def test_max_batch_size_one_scores_every_request_alone():
  requests = [_arrays(i, 1) for i in range(5)]
  scorer = RowScorer()
  asyncio.run(_serve(scorer, requests, max_batch_size=1, max_delay_s=0.05))
  assert scorer.calls == [1] * 5


def test_a_failed_call_fails_its_requests_and_the_batcher_goes_on():
  # The call that contains request 2 (input_ids all 77) fails; others pass.
  poisoned = {"input_ids": np.full((1, 6), 77, np.int32),
              "image_present": np.zeros((1,), np.int32)}
  requests = [_arrays(0, 2), _arrays(1, 2), poisoned, _arrays(3, 2)]
  scorer = RowScorer(fail_when=lambda a: (a["input_ids"] == 77).all(-1).any())

  async def run():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      batcher = batching.DynamicBatcher(scorer, max_batch_size=2,
                                        max_delay_s=0.0, executor=pool)
      batcher.start()
      answers = await asyncio.gather(*(batcher.submit(a) for a in requests),
                                     return_exceptions=True)
      after = await batcher.submit(_arrays(9, 3))  # Still serving.
      await batcher.close()
      return answers, after

  answers, after = asyncio.run(run())
  assert isinstance(answers[2], RuntimeError)
  for i in (0, 1, 3):
    np.testing.assert_array_equal(answers[i], RowScorer()(requests[i]))
  np.testing.assert_array_equal(after, RowScorer()(_arrays(9, 3)))


def test_a_cancelled_request_does_not_disturb_the_others():
  async def run():
    scorer = RowScorer()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      batcher = batching.DynamicBatcher(scorer, max_batch_size=16,
                                        max_delay_s=0.2, executor=pool)
      batcher.start()
      gone = asyncio.ensure_future(batcher.submit(_arrays(0, 3)))
      kept = asyncio.ensure_future(batcher.submit(_arrays(1, 2)))
      await asyncio.sleep(0.01)
      gone.cancel()  # The client hung up while waiting for its batch.
      answer = await kept
      await batcher.close()
      return answer, scorer.calls

  answer, calls = asyncio.run(run())
  np.testing.assert_array_equal(answer, RowScorer()(_arrays(1, 2)))
  assert calls == [2]


def test_bad_settings_are_refused():
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    with pytest.raises(ValueError, match="max_batch_size"):
      batching.DynamicBatcher(RowScorer(), max_batch_size=0, max_delay_s=0,
                              executor=pool)
    with pytest.raises(ValueError, match="max_delay_s"):
      batching.DynamicBatcher(RowScorer(), max_batch_size=4, max_delay_s=-1,
                              executor=pool)
