"""The review server: tokens, bad input, two reviewers at once, photos.

The real aiohttp app and SQLite store on a free port; the export is a
bundle with labels and a manifest only (the server never runs the model),
the scores are written as ``mic-jax-predict`` writes them.
"""

import concurrent.futures
import hashlib
import json
import sqlite3

import pytest
import requests

import review_helpers
from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import store as store_lib
from mic_jax.serving import bundle

LABELS = ["bag", "shirt", "shoe", "watch"]
TAXONOMY = {"levels": ["group", "type"],
            "parents": {"bag": {"accessories": 3}, "watch": {"accessories": 2},
                        "shirt": {"apparel": 4}, "shoe": {"footwear": 5}}}


@pytest.fixture()
def setup(tmp_path):
  with review_helpers.sample_site(tmp_path, LABELS, TAXONOMY,
                                  ("alice", "bob"), max_body_bytes=4096) as s:
    yield s


def _auth(token):
  return {"Authorization": f"Bearer {token}"}


def _decide(s, token, **body):
  return requests.post(s["url"] + "/api/decisions", json=body,
                       headers=_auth(token), timeout=30)


def test_without_a_valid_token_nothing_is_readable_or_writable(setup):
  s = setup
  reads = ["/", "/static/app.js", "/static/app.css", "/api/queue",
           "/api/labels", "/api/photo/p1", "/api/decisions.csv", "/nope"]
  for headers in ({}, _auth("not-a-token"), {"Cookie": "mic_review=x"},
                  _auth(s["tokens"]["alice"][:-1])):
    for path in reads:
      r = requests.get(s["url"] + path, headers=headers, timeout=30,
                       allow_redirects=False)
      assert r.status_code == 401, (path, headers, r.status_code)
      assert "product number" not in r.text and "shirt" not in r.text
    r = requests.post(s["url"] + "/api/decisions", headers=headers,
                      json={"product": "p1", "status": "accepted",
                            "label": "bag", "base_version": 0}, timeout=30)
    assert r.status_code == 401
  assert s["store"].decisions() == {}
  # The page's 401 is the sign-in form; a wrong token gets it again.
  page = requests.get(s["url"] + "/", timeout=30)
  assert 'action="/login"' in page.text
  r = requests.post(s["url"] + "/login", data={"token": "wrong"},
                    headers={"Origin": s["url"]}, allow_redirects=False,
                    timeout=30)
  assert r.status_code == 401 and "not valid" in r.text


def test_sign_in_sets_a_cookie_that_opens_everything(setup):
  s = setup
  session = requests.Session()
  session.headers["Origin"] = s["url"]  # As a browser sends it.
  r = session.post(s["url"] + "/login", data={"token": s["tokens"]["bob"]},
                   allow_redirects=False, timeout=30)
  assert r.status_code == 303
  cookie = r.headers["Set-Cookie"]
  assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
  page = session.get(s["url"] + "/", timeout=30)
  assert page.status_code == 200 and 'src="/static/app.js"' in page.text
  assert "default-src 'self'" in page.headers["Content-Security-Policy"]
  assert session.get(s["url"] + "/static/app.js", timeout=30).ok
  assert session.get(s["url"] + "/api/queue", timeout=30).json()[
      "reviewer"] == "bob"
  session.post(s["url"] + "/logout", timeout=30)
  assert session.get(s["url"] + "/api/queue", timeout=30).status_code == 401


def test_tokens_are_stored_only_as_hashes(setup):
  s = setup
  raw = b"".join(f.read_bytes() for f in s["db"].parent.glob(
      "review.sqlite*"))
  for token in s["tokens"].values():
    assert token.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw
  assert s["store"].reviewer_of(s["tokens"]["alice"]) == "alice"
  assert s["store"].reviewer_of("") is None
  with pytest.raises(store_lib.StoreError, match="exists"):
    s["store"].add_reviewer("alice")


def test_queue_puts_abstentions_first_and_serves_the_scored_photos(setup):
  s = setup
  token = s["tokens"]["alice"]
  queue = requests.get(s["url"] + "/api/queue", headers=_auth(token),
                       timeout=30).json()
  order = [p["id"] for p in queue["products"]]
  assert order == ["p2", "p1", "p4", "p0", "p3"]  # Abstained, least sure first.
  assert queue["progress"] == {"total": 5, "decided": 0, "remaining": 5,
                               "abstained": 3, "abstained_decided": 0,
                               "states": {}}
  top = queue["products"][0]["top_k"][0]
  assert top == {"label": "shoe", "prob": 0.3, "path": "footwear > shoe"}
  for product, data in s["photos"].items():
    r = requests.get(s["url"] + f"/api/photo/{product}", headers=_auth(token),
                     timeout=30)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Type"] == "image/jpeg"
  for product, status in (("p0", 404), ("zz", 404)):
    r = requests.get(s["url"] + f"/api/photo/{product}", headers=_auth(token),
                     timeout=30)
    assert r.status_code == status and product in r.json()["error"]
  labels = requests.get(s["url"] + "/api/labels", headers=_auth(token),
                        timeout=30).json()["labels"]
  assert [l["label"] for l in labels] == LABELS


@pytest.mark.parametrize("body,status,needle", [
    ({"product": "p1", "status": "relabelled", "label": "hat"}, 400,
     "unknown label 'hat'"),
    ({"product": "p99", "status": "accepted", "label": "bag"}, 404,
     "unknown product 'p99'"),
    ({"product": "p1", "status": "maybe", "label": "bag"}, 400,
     "unknown status 'maybe'"),
    ({"product": "p1", "status": "unclear", "label": "bag"}, 400,
     "takes no label"),
    ({"product": "p1", "status": "accepted"}, 400, "unknown label None"),
    ({"status": "accepted", "label": "bag"}, 400, "'product'"),
    ({"product": "p1", "status": "accepted", "label": "bag",
      "base_version": "1"}, 400, "base_version"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_decisions_get_a_4xx_naming_what(setup, body, status, needle):
  s = setup
  r = requests.post(s["url"] + "/api/decisions", json=body,
                    headers=_auth(s["tokens"]["alice"]), timeout=30)
  assert r.status_code == status, r.text
  assert needle in r.json()["error"]
  assert s["store"].decisions() == {}


def test_malformed_oversized_and_non_json_bodies(setup):
  s = setup
  headers = {**_auth(s["tokens"]["alice"]),
             "Content-Type": "application/json"}
  url = s["url"] + "/api/decisions"
  r = requests.post(url, data=b"{not json", headers=headers, timeout=30)
  assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
  r = requests.post(url, data=b" " * 5000, headers=headers, timeout=30)
  assert r.status_code == 413 and "4096" in r.json()["error"]
  r = requests.post(url, data={"product": "p1"},
                    headers=_auth(s["tokens"]["alice"]), timeout=30)
  assert r.status_code == 415
  assert s["store"].decisions() == {}


def test_two_reviewers_at_once_one_wins_and_the_other_sees_it(setup):
  s = setup
  alice, bob = s["tokens"]["alice"], s["tokens"]["bob"]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(_decide, s, token, product="p2", status=status,
                           label=label, base_version=0)
               for token, status, label in (
                   (alice, "accepted", "shoe"), (bob, "relabelled", "bag"))]
    replies = [f.result() for f in futures]
  codes = sorted(r.status_code for r in replies)
  assert codes == [200, 409], [r.text for r in replies]
  won = next(r for r in replies if r.status_code == 200).json()["decision"]
  lost = next(r for r in replies if r.status_code == 409).json()
  assert lost["current"] == won  # The second sees the first decision.
  assert won["reviewer"] in lost["error"] and "version 1" in lost["error"]
  loser = bob if won["reviewer"] == "alice" else alice
  # Deciding again on an outdated version is refused too ...
  assert _decide(s, loser, product="p2", status="unclear", label=None,
                 base_version=0).status_code == 409
  # ... and overriding with the version seen is recorded, not lost.
  r = _decide(s, loser, product="p2", status="unclear", label=None,
              base_version=1)
  assert r.status_code == 200 and r.json()["decision"]["version"] == 2
  history = s["store"].history("p2")
  assert [(h["version"], h["replaced_version"]) for h in history] == [
      (1, 0), (2, 1)]
  assert [h["reviewer"] for h in history] == [won["reviewer"],
                                               "bob" if loser == bob
                                               else "alice"]
  assert r.json()["progress"]["decided"] == 1
  assert all(h["export"] == bundle.identity(s["export"]) for h in history)


def test_many_concurrent_writers_lose_nothing(setup):
  """Twenty threads on five products, each on the version it read: each
  write either lands (and is in the history) or gets a 409."""
  s = setup
  tokens = list(s["tokens"].values())

  def attempt(i):
    product = f"p{i % 5}"
    current = s["store"].decision(product)
    return _decide(s, tokens[i % 2], product=product, status="accepted",
                   label="bag", base_version=current.version if current
                   else 0).status_code

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    codes = list(pool.map(attempt, range(20)))
  assert set(codes) <= {200, 409}
  history = s["store"].history()
  assert len(history) == codes.count(200)
  for product, decision in s["store"].decisions().items():
    versions = [h["version"] for h in history if h["product_id"] == product]
    assert versions == list(range(1, decision.version + 1))


def test_decisions_csv_and_program_flags(setup):
  s = setup
  _decide(s, s["tokens"]["alice"], product="p1", status="relabelled",
          label="watch", base_version=0)
  r = requests.get(s["url"] + "/api/decisions.csv",
                   headers=_auth(s["tokens"]["bob"]), timeout=30)
  lines = r.text.splitlines()
  assert lines[0] == ",".join(store_lib.CSV_COLUMNS)
  assert lines[1].startswith("p1,relabelled,watch,alice,")


def test_scores_of_another_export_are_refused(setup, tmp_path):
  s = setup
  other = review_helpers.fake_export(tmp_path / "other", LABELS + ["hat"])
  with pytest.raises(queue_lib.QueueError, match=r"scores\.jsonl:1: scored "
                     r"with export .* review with the export"):
    queue_lib.load(s["scores"], other)
  bad = tmp_path / "bad.jsonl"
  row = dict(s["rows"][0], top_k=[{"label": "hat", "prob": 1.0}])
  bad.write_text(json.dumps(row) + "\n")
  with pytest.raises(queue_lib.QueueError, match=r"bad\.jsonl:1: labels "
                     r"\['hat'\]"):
    queue_lib.load(bad, s["export"])


def test_the_database_is_in_wal_mode(setup):
  db = sqlite3.connect(setup["db"])
  assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  db.close()


def test_the_program_adds_reviewers_serves_and_exports(setup, tmp_path):
  """mic-jax-review as a user runs it: --add-reviewer prints a token once,
  the server answers with it, --decisions_csv writes the decisions."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  db = tmp_path / "cli.sqlite"
  program = [sys.executable, "-m", "mic_jax.review", f"--db={db}"]
  added = subprocess.run(program + ["--add-reviewer", "carla"], check=True,
                         capture_output=True, text=True, timeout=120)
  token = added.stdout.splitlines()[-1]
  assert "shown only now" in added.stdout and len(token) >= 40
  assert store_lib.Store(db).reviewer_of(token) == "carla"
  again = subprocess.run(program + ["--add-reviewer=carla"],
                         capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and "exists already" in again.stderr
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      program + [f"--scores={setup['scores']}",
                 f"--export={setup['export']}", f"--port={port}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
      try:
        requests.get(url + "/", timeout=5)
        break
      except requests.ConnectionError:
        assert server.poll() is None, server.stdout.read()
        time.sleep(0.2)
    assert requests.get(url + "/api/queue", timeout=30).status_code == 401
    r = requests.post(url + "/api/decisions", headers=_auth(token),
                      timeout=30, json={"product": "p3", "status":
                                        "accepted", "label": "watch"})
    assert r.status_code == 200, r.text
  finally:
    server.terminate()
    server.wait(30)
  csv_out = tmp_path / "d.csv"
  done = subprocess.run(program + [f"--decisions_csv={csv_out}"], check=True,
                        capture_output=True, text=True, timeout=120)
  assert "wrote 1 decisions" in done.stdout
  revoked = subprocess.run(program + ["--revoke-reviewer", "carla"],
                           check=True, capture_output=True, text=True,
                           timeout=120)
  assert "carla revoked" in revoked.stdout
  assert store_lib.Store(db).reviewer_of(token) is None
  assert csv_out.read_text().splitlines()[1].startswith(
      "p3,accepted,watch,carla,")


# ------------------------------------------------- issue 32: defects found --


def _bad_scores(tmp_path, s, line: bytes):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(json.dumps(s["rows"][0]).encode() + b"\n" + line + b"\n")
  return path


@pytest.mark.parametrize("line,needle", [
    (b'["a", "list"]', "a JSON object, got a list"),
    (b'{"id": "x", "top_k": [{"prob": 0.5}]}', "top_k entry 1 has no label"),
    (b'{"id": "x", "top_k": [{"label": "bag", "prob": "0.5"}]}',
     "probability"),
    (b'{"id": "x", "top_k": "bag"}', "'top_k' must be a list"),
    (b'{"id": "\xff\xfe"}', "not UTF-8"),
    (b'{"id": "x", "top_k": [{"label": "bag", "prob": 0.5}], '
     b'"photo": "/a/b.jpg"}', "'photo' must be"),
])
def test_a_bad_scores_line_is_named_at_start_up(setup, tmp_path, line,
                                                needle):
  s = setup
  identity = bundle.identity(s["export"])
  line = line.replace(b'{"id"', b'{"export": "%s", "id"' % identity.encode())
  with pytest.raises(queue_lib.QueueError, match=r"bad\.jsonl:2: ") as e:
    queue_lib.load(_bad_scores(tmp_path, s, line), s["export"])
  assert needle in str(e.value)


def test_rows_predict_could_not_score_are_counted(setup, tmp_path):
  s = setup
  path = _bad_scores(tmp_path, s, b'{"id": "x", "error": "no title"}\n'
                     b'{"error": "bad photo"}')
  queue = queue_lib.load(path, s["export"])
  assert len(queue) == 1 and queue.skipped_errors == 2
  from mic_jax import review  # pylint: disable=g-import-not-at-top
  summary = review.summary(queue, s["store"], str(path))
  assert "2 rows skipped" in summary and "'error'" in summary


def test_a_database_that_cannot_be_opened_is_named(tmp_path):
  for bad in (tmp_path / "a_directory", tmp_path / "not_a_db"):
    if bad.name == "a_directory":
      bad.mkdir()
    else:
      bad.write_text("hello, not sqlite\n" * 100)
    with pytest.raises(store_lib.StoreError, match=str(bad)):
      store_lib.Store(bad)


def test_the_queue_does_not_show_server_paths(setup):
  s = setup
  r = requests.get(s["url"] + "/api/queue",
                   headers=_auth(s["tokens"]["alice"]), timeout=30)
  assert str(s["db"].parent) not in r.text
  photos = {p["id"]: p["photo"] for p in r.json()["products"]}
  assert photos == {"p0": False, "p1": True, "p2": True, "p3": False,
                    "p4": False}


def test_non_utf8_tokens_and_cookies_get_401_not_500(setup):
  s = setup
  for headers in ({"Authorization": b"Bearer \xff\xfe-token"},
                  {"Cookie": b"mic_review=\xff\xfe"},
                  {"Authorization": "Bearer " + "\u00e9" * 50}):
    for path in ("/", "/api/queue"):
      r = requests.get(s["url"] + path, headers=headers, timeout=30)
      assert r.status_code == 401, (headers, path, r.status_code)
  r = requests.post(s["url"] + "/login", data=b"token=%FF%FE",
                    headers={"Content-Type":
                             "application/x-www-form-urlencoded"},
                    timeout=30)
  assert r.status_code in (400, 401, 403), r.status_code


def test_an_impossible_base_version_is_a_4xx_the_page_can_show(setup):
  s = setup
  alice = s["tokens"]["alice"]
  huge = _decide(s, alice, product="p1", status="accepted", label="bag",
                 base_version=int("9" * 4000))
  assert huge.status_code in (400, 413), huge.text
  r = requests.post(s["url"] + "/api/decisions", data=(
      '{"product": "p1", "status": "unclear", "label": null, '
      '"base_version": ' + "9" * 4000 + "}").encode(),
                    headers={**_auth(alice), "Content-Type":
                             "application/json"}, timeout=30)
  assert r.status_code in (400, 413), r.text
  ahead = _decide(s, alice, product="p1", status="accepted", label="bag",
                  base_version=3)
  assert ahead.status_code == 400, ahead.text
  assert "ahead of" in ahead.json()["error"] and "reload" in ahead.json()[
      "error"]
  assert s["store"].decisions() == {}
  assert _decide(s, alice, product="p1", status="accepted", label="bag",
                 base_version=0).status_code == 200
  assert _decide(s, alice, product="p1", status="accepted", label="bag",
                 base_version=2).status_code == 400


def _hold_the_database(path):
  """Another process's write transaction (what the server waits for)."""
  db = sqlite3.connect(path, isolation_level=None)
  db.execute("BEGIN IMMEDIATE")
  return db


def test_a_save_while_the_database_is_busy_is_a_named_503(setup):
  s = setup
  s["store"].busy_timeout = 0.2
  holder = _hold_the_database(s["db"])
  try:
    r = _decide(s, s["tokens"]["alice"], product="p1", status="accepted",
                label="bag", base_version=0)
  finally:
    holder.execute("ROLLBACK")
    holder.close()
  assert r.status_code == 503, r.text
  assert "busy" in r.json()["error"] and r.json()["retry_after"] > 0
  assert int(r.headers["Retry-After"]) > 0
  r = _decide(s, s["tokens"]["alice"], product="p1", status="accepted",
              label="bag", base_version=0)
  assert r.status_code == 200


def _sign_in(s, token, origin=True):
  headers = {"Origin": s["url"]} if origin is True else (
      {"Origin": origin} if origin else {})
  return requests.post(s["url"] + "/login", data={"token": token},
                       headers=headers, allow_redirects=False, timeout=30)


def test_the_cookie_is_a_session_that_sign_out_ends(setup):
  s = setup
  r = _sign_in(s, s["tokens"]["bob"])
  assert r.status_code == 303
  session = r.cookies["mic_review"]
  assert session != s["tokens"]["bob"] and s["tokens"]["bob"] not in r.headers[
      "Set-Cookie"]
  raw = b"".join(f.read_bytes() for f in s["db"].parent.glob(
      "review.sqlite*"))
  assert session.encode() not in raw  # Stored only hashed.
  cookie = {"Cookie": f"mic_review={session}"}
  assert requests.get(s["url"] + "/api/queue", headers=cookie,
                      timeout=30).json()["reviewer"] == "bob"
  out = requests.post(s["url"] + "/logout", headers={**cookie,
                                                     "Origin": s["url"]},
                      allow_redirects=False, timeout=30)
  assert out.status_code == 303
  assert requests.get(s["url"] + "/api/queue", headers=cookie,
                      timeout=30).status_code == 401
  # The token itself is no cookie.
  assert requests.get(s["url"] + "/api/queue", timeout=30, headers={
      "Cookie": f"mic_review={s['tokens']['bob']}"}).status_code == 401


def test_a_revoked_reviewer_loses_token_and_sessions(setup):
  s = setup
  session = _sign_in(s, s["tokens"]["bob"]).cookies["mic_review"]
  assert s["store"].revoke_reviewer("bob") == 1
  cookie = {"Cookie": f"mic_review={session}"}
  for headers in (cookie, _auth(s["tokens"]["bob"])):
    assert requests.get(s["url"] + "/api/queue", headers=headers,
                        timeout=30).status_code == 401
  assert _sign_in(s, s["tokens"]["bob"]).status_code == 401
  assert requests.get(s["url"] + "/api/queue", headers=_auth(
      s["tokens"]["alice"]), timeout=30).status_code == 200
  with pytest.raises(store_lib.StoreError, match="no reviewer 'carl'"):
    s["store"].revoke_reviewer("carl")
  with pytest.raises(store_lib.StoreError, match="exists already"):
    s["store"].add_reviewer("bob")  # Decisions keep naming one person.


def test_a_sign_in_from_another_origin_is_refused(setup):
  """Login CSRF: a form on another localhost port must not sign the
  victim's browser in as someone else."""
  s = setup
  for origin in ("http://127.0.0.1:1", "null", None):
    r = _sign_in(s, s["tokens"]["bob"], origin=origin)
    assert r.status_code == 403, (origin, r.status_code)
    assert "mic_review" not in r.cookies and "origin" in r.text.lower()
  session = _sign_in(s, s["tokens"]["bob"]).cookies["mic_review"]
  r = requests.post(s["url"] + "/logout", allow_redirects=False, timeout=30,
                    headers={"Cookie": f"mic_review={session}",
                             "Origin": "http://127.0.0.1:1"})
  assert r.status_code == 403
  assert requests.get(s["url"] + "/api/queue", timeout=30, headers={
      "Cookie": f"mic_review={session}"}).status_code == 200


def test_a_token_in_a_query_string_is_refused_and_never_logged(setup,
                                                                caplog):
  s = setup
  token = s["tokens"]["alice"]
  with caplog.at_level("INFO"):
    r = requests.get(s["url"] + f"/api/queue?token={token}&x=1", timeout=30)
    assert r.status_code == 401
    assert requests.get(s["url"] + "/api/labels", headers=_auth(token),
                        timeout=30).ok
    # The server logs a request after its response is sent: the client can
    # be back first on a loaded machine.
    import time  # pylint: disable=g-import-not-at-top
    for _ in range(200):
      logged = "\n".join(r.getMessage() for r in caplog.records)
      if "/api/labels" in logged:
        break
      time.sleep(0.05)
  assert "/api/queue" in logged and "/api/labels" in logged
  assert token not in logged and "token=" not in logged


def test_the_queue_is_served_a_page_at_a_time_and_resumes(setup):
  s = setup
  token = s["tokens"]["alice"]
  get = lambda path: requests.get(s["url"] + path, headers=_auth(token),
                                  timeout=30)
  seen, after = [], 0
  while after is not None:
    page = get(f"/api/queue?after={after}&limit=2").json()
    assert len(page["products"]) <= 2 and page["total"] == 5
    seen += [(p["rank"], p["id"]) for p in page["products"]]
    after = page["next"]
  assert seen == list(enumerate(["p2", "p1", "p4", "p0", "p3"], 1))
  assert get("/api/queue").json()["resume"] == 1
  for product, label in (("p2", "shoe"), ("p4", "bag")):
    assert _decide(s, token, product=product, status="accepted",
                   label=label, base_version=0).status_code == 200
  assert _decide(s, token, product="p1", status="unclear", label=None,
                 base_version=0).status_code == 200
  page = get("/api/queue").json()
  assert page["resume"] == 4  # p0: where the reviewer stopped.
  assert [p["id"] for p in get("/api/queue?undecided=1").json()[
      "products"]] == ["p0", "p3"]
  assert get("/api/progress").json() == {
      "total": 5, "decided": 3, "remaining": 2, "abstained": 3,
      "abstained_decided": 3, "states": {"accepted": 2, "unclear": 1}}
  for bad in ("after=x", "limit=0", "limit=100000", "after=-1"):
    assert get(f"/api/queue?{bad}").status_code == 400
