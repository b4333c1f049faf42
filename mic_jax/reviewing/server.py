"""The review web app (aiohttp): a page, its JSON API and the photos.

Every request needs a reviewer: an ``Authorization: Bearer TOKEN`` header
(API clients), or the ``mic_review`` cookie that signing in with the
token sets (``POST /login``). The cookie holds a server-side session
(:mod:`mic_jax.reviewing.store`), never the token; ``POST /logout`` ends
it. Without either, ``/`` answers 401 with the sign-in form (which shows
nothing of the data) and everything else 401 JSON. A POST without a
Bearer token must come from this page (``Origin`` is this host and
port), else 403: no other site or localhost port can sign a browser in
(login CSRF), out, or decide for it. The page is plain HTML, CSS and
JavaScript shipped in the package (``static/``), no build step.

  GET  /                     the page
  GET  /static/{app.js,app.css}
  POST /login, /logout       start / end a session (the form's token)
  GET  /api/queue?after=RANK&limit=N[&undecided=1]
                             a page of products in review order (each with
                             its ``rank``, 1-based, and decision; ``photo``:
                             whether there is one, never the server's file
                             paths), ``next`` (the cursor of the next page,
                             or null), ``total``, ``resume`` (the rank of
                             the first undecided product), ``progress``,
                             ``selection`` (which products the queue
                             holds: ``{"queue": "uncertain"}``, or the
                             suspected label errors with their thresholds
                             and how many products were ``considered``
                             and ``kept``)
  GET  /api/progress         decided / remaining, of the abstained ones,
                             and per status (``states``)
  GET  /api/labels           the export's labels and taxonomy paths
  GET  /api/photo/{id}       the photo the model scored (JPEG)
  POST /api/decisions        {"product", "status", "label", "base_version"}
                             -> 200 {"decision", "progress"}; 409
                             {"error", "current"} when someone decided the
                             product since ``base_version``
  GET  /api/decisions.csv    the current decisions (for prepare
                             --corrections)

A write that waits more than the store's ``busy_timeout`` for another
process holding the database answers 503 ``{"error", "retry_after"}``
(and ``Retry-After``); the page shows it and saves again.

Bad input gets a 4xx naming it: malformed JSON or a missing field 400, an
unknown label 400, an unknown product 404, a body over ``max_body_bytes``
413, a POST that is not JSON 415 (which also keeps other sites' forms out).
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import json
from typing import Any
import urllib.parse

from aiohttp import abc as aiohttp_abc
from aiohttp import web

from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import store as store_lib

COOKIE = "mic_review"
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
_PAGE_CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; "
             "script-src 'self'; frame-ancestors 'none'; form-action 'self'")
_SIGN_IN_CSP = ("default-src 'none'; style-src 'unsafe-inline'; "
                "frame-ancestors 'none'; form-action 'self'")
REVIEWER = web.RequestKey("reviewer", str)
RETRY_AFTER = 1  # Seconds the page waits before saving again after a 503.
PAGE = 100       # Products per /api/queue page unless ``limit`` says.
MAX_PAGE = 1000


def static_text(name: str) -> str:
  """A file of the page (shipped as package data)."""
  return (importlib.resources.files("mic_jax.reviewing") / "static" /
          name).read_text(encoding="utf-8")


def _sign_in_page(message: str = "") -> web.Response:
  note = (f'<p class="error" role="alert">{html.escape(message)}</p>'
          if message else "")
  body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - product review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}
input{{width:100%;font:inherit;padding:.4rem;box-sizing:border-box}}
button{{font:inherit;margin-top:.6rem;padding:.4rem 1rem}}.error{{color:#a00}}</style></head>
<body><h1>Product review</h1>{note}
<form method="post" action="/login">
<label for="token">Reviewer token (from <code>mic-jax-review --add-reviewer NAME</code>)</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus required>
<button type="submit">Sign in</button></form></body></html>"""
  return web.Response(text=body, status=401, content_type="text/html",
                      headers={"Content-Security-Policy": _SIGN_IN_CSP,
                               "Cache-Control": "no-store"})


def _error(status: int, message: str, *,
           headers: dict[str, str] | None = None, **extra: Any
           ) -> web.Response:
  return web.json_response({"error": message, **extra}, status=status,
                           headers={"Cache-Control": "no-store",
                                    **(headers or {})})


def _bearer(request: web.Request) -> str | None:
  """The ``Authorization: Bearer`` token (API clients), if well formed."""
  header = request.headers.get("Authorization", "")
  if not header.startswith("Bearer "):
    return None
  token = header[len("Bearer "):].strip()
  return token if store_lib.well_formed(token) else None


def _session(request: web.Request) -> str | None:
  """The sign-in cookie's session id, if well formed."""
  session = request.cookies.get(COOKIE)
  return session if store_lib.well_formed(session) else None


def _cross_origin() -> web.Response:
  """A browser's POST (sign-in, sign-out, a decision) from another page,
  e.g. a form on another localhost port (login CSRF)."""
  return _error(403, "refused: this request's Origin is not this page's "
                "(sign in from the review page itself)")


def _same_origin(request: web.Request) -> bool:
  """Whether a browser POST comes from this page: its ``Origin`` names
  this host and port (another localhost port is another origin). Without
  the header, no: browsers send it on every POST."""
  origin = request.headers.get("Origin", "")
  try:
    netloc = urllib.parse.urlsplit(origin).netloc
  except ValueError:
    return False
  return bool(netloc) and netloc == request.host


class AccessLogger(aiohttp_abc.AbstractAccessLogger):
  """One line per request without its query string or Referer: a token
  pasted into a URL is refused (401) and must not reach ``review.log``."""

  def log(self, request: web.BaseRequest, response: web.StreamResponse,
          time: float) -> None:
    self.logger.info("%s %s %s %d %d %.3fs", request.remote, request.method,
                     request.path, response.status, response.body_length,
                     time)


def runner_options() -> dict[str, Any]:
  """How the program (and the tests) run the app: with :class:`AccessLogger`."""
  return {"access_log_class": AccessLogger}


def make_app(queue: queue_lib.Queue, store: store_lib.Store, *,
             max_body_bytes: int = 16 * 1024) -> web.Application:
  """The review app over a loaded queue and an open store."""
  photos = queue_lib.Photos(queue)
  known_labels = set(queue.labels)

  def progress() -> dict[str, Any]:
    return queue.progress(store)

  @web.middleware
  async def busy(request: web.Request, handler):
    """A store another process holds answers a named 503 the page retries,
    never a plain-text 500."""
    try:
      return await handler(request)
    except store_lib.Busy as e:
      return _error(503, str(e), retry_after=RETRY_AFTER,
                    headers={"Retry-After": str(RETRY_AFTER)})

  @web.middleware
  async def auth(request: web.Request, handler):
    loop = asyncio.get_running_loop()
    bearer = _bearer(request)
    if request.path == "/login" and request.method == "POST":
      if not _same_origin(request):
        return _cross_origin()
      return await handler(request)
    if bearer is not None:
      reviewer = await loop.run_in_executor(None, store.reviewer_of, bearer)
    else:
      reviewer = await loop.run_in_executor(None, store.session_reviewer,
                                            _session(request))
    if reviewer is None:
      if request.path == "/" and request.method == "GET":
        return _sign_in_page()
      return _error(401, "sign in: a valid reviewer token is needed "
                    "(mic-jax-review --add-reviewer NAME prints one)")
    if request.method == "POST" and bearer is None and not _same_origin(
        request):
      return _cross_origin()
    request[REVIEWER] = reviewer
    response = await handler(request)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response

  async def login(request: web.Request) -> web.StreamResponse:
    try:
      form = await request.post()
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f"request body over {max_body_bytes} bytes")
    token = str(form.get("token", "")).strip()
    loop = asyncio.get_running_loop()
    reviewer = await loop.run_in_executor(None, store.reviewer_of, token)
    if reviewer is None:
      return _sign_in_page("That token is not valid.")
    session = await loop.run_in_executor(None, store.start_session, reviewer)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, session, httponly=True, samesite="Strict",
                        path="/", max_age=store_lib.SESSION_DAYS * 86400)
    raise response

  async def logout(request: web.Request) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.end_session, _session(request))
    response = web.HTTPSeeOther("/")
    response.del_cookie(COOKIE, path="/")
    raise response

  async def page(request: web.Request) -> web.Response:
    del request
    return web.Response(text=static_text("index.html"),
                        content_type="text/html",
                        headers={"Content-Security-Policy": _PAGE_CSP})

  async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
      return _error(404, f"no static file {name!r}")
    return web.Response(text=static_text(name),
                        content_type=STATIC_FILES[name])

  def queue_page(after: int, limit: int, undecided: bool) -> dict[str, Any]:
    counts = progress()  # Also brings the statuses up to date.
    rows = queue.page(after, limit, undecided=undecided)
    decided = store.decisions_of([p["id"] for p in rows])
    for p in rows:
      d = decided.get(p["id"])
      p["decision"] = d.as_dict() if d else None
    return {"products": rows, "progress": counts, "total": queue.total,
            "next": rows[-1]["rank"] if len(rows) == limit else None,
            "resume": queue.first_undecided()}

  async def products(request: web.Request) -> web.Response:
    query = request.query
    try:
      after = int(query.get("after", "0"))
      limit = int(query.get("limit", str(PAGE)))
    except ValueError:
      return _error(400, "'after' and 'limit' are whole numbers")
    if not (0 <= after <= store_lib.MAX_VERSION and 1 <= limit <= MAX_PAGE):
      return _error(400, f"'after' is a rank (0 or more) and 'limit' "
                    f"1-{MAX_PAGE}")
    undecided = query.get("undecided") == "1"
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(None, queue_page, after, limit,
                                      undecided)
    return web.json_response({
        "reviewer": request[REVIEWER], "export": queue.export,
        "model": queue.model, "selection": queue.selection, **body})

  async def progress_counts(request: web.Request) -> web.Response:
    del request
    loop = asyncio.get_running_loop()
    return web.json_response(await loop.run_in_executor(None, progress))

  async def labels(request: web.Request) -> web.Response:
    del request
    return web.json_response({"labels": queue.label_entries()})

  async def photo(request: web.Request) -> web.Response:
    product = request.match_info["product"]
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, queue.__contains__, product):
      return _error(404, f"unknown product {product!r}")
    data = await loop.run_in_executor(None, photos.get, product)
    if not data:
      return _error(404, f"product {product!r} has no photo")
    return web.Response(body=data, content_type="image/jpeg")

  async def decide(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
      return _error(415, "send the decision as application/json")
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f"request body over {max_body_bytes} bytes")
    try:
      payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # Over-long numbers too.
      return _error(400, f"malformed JSON: {e}"[:300])
    if not isinstance(payload, dict):
      return _error(400, "the body must be a JSON object")
    product = payload.get("product")
    status = payload.get("status")
    label = payload.get("label")
    base = payload.get("base_version", 0)
    if not isinstance(product, str):
      return _error(400, "'product' (a product id) is missing")
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, queue.__contains__, product):
      return _error(404, f"unknown product {product!r}")
    if status not in store_lib.STATUSES:
      return _error(400, f"unknown status {status!r} (one of "
                    f"{', '.join(store_lib.STATUSES)})")
    if status == store_lib.UNCLEAR:
      if label is not None:
        return _error(400, "an unclear decision takes no label")
    elif not isinstance(label, str) or label not in known_labels:
      return _error(400, f"unknown label {label!r} (not one of the "
                    f"export's {len(queue.labels)} labels)")
    if (not isinstance(base, int) or isinstance(base, bool) or base < 0
        or base > store_lib.MAX_VERSION):
      return _error(400, f"'base_version' must be a version number "
                    f"(0-{store_lib.MAX_VERSION}), got {str(base)[:40]!r}")
    try:
      decision = await loop.run_in_executor(None, lambda: store.decide(
          product, status, label, reviewer=request[REVIEWER],
          export=queue.export, base_version=base))
    except store_lib.Conflict as e:
      return _error(409, str(e), current=e.current.as_dict()
                    if e.current else None)
    except store_lib.StoreError as e:
      return _error(400, str(e))
    counts = await loop.run_in_executor(None, progress)
    return web.json_response({"decision": decision.as_dict(),
                              "progress": counts})

  async def decisions_csv(request: web.Request) -> web.Response:
    del request
    return web.Response(text=store_lib.csv_text(store),
                        content_type="text/csv",
                        headers={"Content-Disposition":
                                 'attachment; filename="decisions.csv"'})

  app = web.Application(client_max_size=max_body_bytes, middlewares=[busy, auth])
  app.add_routes([
      web.get("/", page), web.post("/login", login),
      web.post("/logout", logout), web.get("/static/{name}", static),
      web.get("/api/queue", products), web.get("/api/labels", labels),
      web.get("/api/progress", progress_counts),
      web.get("/api/photo/{product}", photo),
      web.post("/api/decisions", decide),
      web.get("/api/decisions.csv", decisions_csv)])
  return app
