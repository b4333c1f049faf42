r"""An HTTP JSON service for an exported model (aiohttp).

  python -m mic_jax.serve --model=EXPORT --port=8080

  GET  /healthz     {"status": "ok", "model": ..., "labels": N,
                     "batching": {"requests", "batches", "mean_batch", ...}}
  POST /v1/predict  {"instances": [{"title": "...", "image_b64": "..."|null},
                                   ...], "top_k": 5}
                 -> {"predictions": [{"top_k": [...], "abstain": ...}, ...]}

Requests are validated before any work: malformed JSON, a missing or empty
title, an image that is not base64 or not a usable picture get a 400, a
body over ``--max_body_bytes`` or more than ``--max_instances`` products a
413, each with ``{"error": "..."}`` naming the instance.

Titles are tokenized and photos decoded on a small thread pool, then the
request joins the dynamic batcher (:mod:`mic_jax.serving.batching`):
concurrent requests are scored together in one call of the model, up to
``--max_batch_size`` products, the first waiting at most
``--batch_delay_ms`` for company. Scoring runs on one thread, so requests
queue instead of competing for the cores, and the event loop keeps
answering health checks meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
from typing import Any

from absl import app
from absl import flags
from aiohttp import web

from mic_jax import console

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines this program's flags (when it runs, never on import)."""
  flags.DEFINE_string("model", None, "Export directory.")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
  flags.DEFINE_integer("port", 8080, "Port.")
  flags.DEFINE_integer("max_body_bytes", 8 * 2**20,
                       "Largest request body accepted.")
  flags.DEFINE_integer("max_instances", 64,
                       "Most products per request.")
  flags.DEFINE_integer(
      "max_batch_size", 64, "Most products scored in one call of the model "
      "(requests are merged up to this; 1 turns batching off).")
  flags.DEFINE_float(
      "batch_delay_ms", 2.0, "How long a request waits for others to share "
      "its batch. 0 still merges whatever queued while the model was busy.")
  flags.DEFINE_integer(
      "encode_threads", 2, "Threads tokenizing titles and decoding photos.")
  console.define_verbose_flag()


class BadRequest(Exception):
  """A client error: status and message for the JSON reply."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _error(status: int, message: str) -> web.Response:
  return web.json_response({"error": message}, status=status)


def parse_request(body: bytes, max_instances: int
                  ) -> tuple[list[str], list[bytes | None], int]:
  """(titles, image bytes or None, top_k) of a predict request."""
  try:
    payload = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRequest(400, f"malformed JSON: {e}") from e
  except RecursionError as e:  # "[[[[..." thousands deep.
    raise BadRequest(400, "malformed JSON: nested too deeply") from e
  if not isinstance(payload, dict) or not isinstance(
      payload.get("instances"), list):
    raise BadRequest(400, 'the body must be {"instances": [...]}')
  instances = payload["instances"]
  if not instances:
    raise BadRequest(400, "no instances")
  if len(instances) > max_instances:
    raise BadRequest(413, f"{len(instances)} instances; at most "
                     f"{max_instances} per request")
  top_k = payload.get("top_k", 5)
  if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
    raise BadRequest(400, f"top_k must be a positive integer, got {top_k!r}")
  titles, images = [], []
  for i, item in enumerate(instances):
    if not isinstance(item, dict):
      raise BadRequest(400, f"instance {i}: expected an object")
    title = item.get("title")
    if not isinstance(title, str) or not title.strip():
      raise BadRequest(400, f"instance {i}: missing or empty 'title'")
    image = item.get("image_b64")
    if image is not None:
      try:
        image = base64.b64decode(image, validate=True)
      except (binascii.Error, TypeError, ValueError) as e:
        raise BadRequest(400, f"instance {i}: 'image_b64' is not base64 "
                         f"({e})") from e
    titles.append(title)
    images.append(image)
  return titles, images, top_k


def make_app(predictor: Any, *, max_body_bytes: int, max_instances: int,
             max_batch_size: int = 64, batch_delay_ms: float = 2.0,
             encode_threads: int = 2) -> web.Application:
  """The service around a loaded :class:`mic_jax.serving.Predictor`."""
  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import PredictionError
  from mic_jax.serving import batching
  # pylint: enable=g-import-not-at-top
  model_thread = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="model")
  encoders = concurrent.futures.ThreadPoolExecutor(
      max_workers=encode_threads, thread_name_prefix="encode")
  batcher = batching.DynamicBatcher(
      predictor.probabilities_of_arrays, max_batch_size=max_batch_size,
      max_delay_s=batch_delay_ms / 1000, executor=model_thread)

  async def healthz(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok",
                              "model": predictor.manifest["model"],
                              "labels": len(predictor.labels),
                              "batching": batcher.stats.as_dict()})

  async def predict(request: web.Request) -> web.Response:
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f"request body over {max_body_bytes} bytes")
    try:
      titles, images, top_k = parse_request(body, max_instances)
      loop = asyncio.get_running_loop()
      arrays = await loop.run_in_executor(
          encoders, lambda: predictor.encode(titles, images))
      probs = await batcher.submit(arrays)
    except BadRequest as e:
      return _error(e.status, str(e))
    except PredictionError as e:
      return _error(400, str(e).replace("product", "instance", 1))
    return web.json_response(
        {"predictions": predictor.results(probs, top_k=top_k)})

  async def start(_):
    batcher.start()

  async def stop(_):
    await batcher.close()
    model_thread.shutdown(wait=False)
    encoders.shutdown(wait=False)

  application = web.Application(client_max_size=max_body_bytes)
  application.add_routes([web.get("/healthz", healthz),
                          web.post("/v1/predict", predict)])
  application.on_startup.append(start)
  application.on_cleanup.append(stop)
  return application


def main(argv):
  del argv
  # No output directory: the log goes to the user's log folder (console).
  with console.session("serve", None, verbose=console.verbose_requested()):
    _serve()


def _serve():
  from mic_jax.serving import ExportDirError, Predictor  # pylint: disable=g-import-not-at-top
  try:
    predictor = Predictor(FLAGS.model)
  except ExportDirError as e:  # Not whole: refuse to serve it.
    raise SystemExit(f"error: {e}") from e
  console.say("model    %s (%s, %d labels); warming up", FLAGS.model,
              predictor.manifest["model"], len(predictor.labels))
  predictor.predict(["warm-up"], [None])  # Load the tokenizer and TF ops.
  # Compile every batch size a call can have before the first client.
  predictor.warm_up(max(FLAGS.max_batch_size, FLAGS.max_instances))
  console.say("serving  http://%s:%d (POST /v1/predict, GET /healthz; log: "
              "%s)", FLAGS.host, FLAGS.port, console.active().log_path)
  web.run_app(make_app(predictor, max_body_bytes=FLAGS.max_body_bytes,
                       max_instances=FLAGS.max_instances,
                       max_batch_size=FLAGS.max_batch_size,
                       batch_delay_ms=FLAGS.batch_delay_ms,
                       encode_threads=FLAGS.encode_threads),
              host=FLAGS.host, port=FLAGS.port, print=None)


def run():
  """Console-script entry point (``mic-jax-serve``)."""
  _define_flags()
  flags.mark_flag_as_required("model")
  app.run(main)


if __name__ == "__main__":
  run()
