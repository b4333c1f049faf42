"""The review page driven as a person uses it, in a real headless Chromium.

Debian's ``chromium`` through Playwright's Python client (Playwright's own
browser download is not used). Without either the tests skip and say how
to install them. The screenshot is kept as a test artifact in
``$MIC_JAX_ARTIFACTS`` (default ``test-artifacts/`` in the repository,
git-ignored).
"""

import os
import pathlib

import pytest
import requests

import review_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
LABELS = ["bag", "belt", "hat", "scarf", "shirt", "shoe", "sock", "watch"]
TAXONOMY = {"levels": ["group", "type"],
            "parents": {l: {("apparel" if l in ("shirt", "sock") else
                             "footwear" if l == "shoe" else "accessories"): 1}
                        for l in LABELS}}


def _artifacts() -> pathlib.Path:
  path = pathlib.Path(os.environ.get("MIC_JAX_ARTIFACTS",
                                     REPO / "test-artifacts"))
  path.mkdir(parents=True, exist_ok=True)
  return path


@pytest.fixture(scope="module")
def _chromium():
  """One Playwright driver and one Chromium for the whole module: starting
  them is most of a short browser test's cost. Tests stay apart because
  each page they open has a context of its own (cookies, storage)."""
  sync_api, executable = review_helpers.chromium_or_skip()
  with sync_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
    try:
      yield b
    finally:
      b.close()


@pytest.fixture()
def browser(_chromium):
  """The module's Chromium; the pages a test opened are closed after it."""
  yield _chromium
  for context in _chromium.contexts:
    context.close()


@pytest.fixture()
def site(tmp_path):
  with review_helpers.sample_site(tmp_path, LABELS, TAXONOMY,
                                  ("ann", "ben")) as s:
    yield s


def expect(locator):
  """Playwright's assertions (they wait), which the page's CSP allows."""
  from playwright.sync_api import expect as playwright_expect  # pylint: disable=g-import-not-at-top
  return playwright_expect(locator)


def _current_title(page) -> str:
  return page.inner_text("#title")


def test_review_three_by_keyboard_one_by_search_and_reload(browser, site):
  page = browser.new_page(viewport={"width": 1100, "height": 640})
  page.goto(site["url"] + "/")
  assert "Sign in" in page.title()  # Nothing else without a token.
  review_helpers.sign_in(page, site["url"], site["tokens"]["ann"])
  assert "decided 0 / 5" in page.inner_text("#progress")
  # Abstained products first, the least confident first: p2, p1, p4.
  assert _current_title(page) == "product number 2"
  assert page.get_attribute("#photo img", "src") == "/api/photo/p2"
  expect(page.locator("#photo img")).to_have_js_property("complete", True,
                                                         timeout=60_000)
  assert page.locator("#photo img").evaluate("i => i.naturalWidth") == 60
  top = page.inner_text("#topk li:first-child")
  assert top.split("\n")[1:] == ["hat", "accessories > hat", "30.0%"]

  page.keyboard.press("Enter")                 # p2: accept the top label.
  expect(page.locator("#title")).to_have_text("product number 1")
  page.keyboard.press("2")                     # p1: accept the 2nd label.
  expect(page.locator("#title")).to_have_text("product number 4")
  page.keyboard.press("u")                     # p4: unclear.
  expect(page.locator("#title")).to_have_text("product number 0")
  # p0: a label outside its top 5, found by search.
  shown = [e["label"] for e in site["rows"][0]["top_k"]]
  other = next(l for l in LABELS if l not in shown)
  page.keyboard.press("/")
  page.keyboard.type(other[:3])
  page.wait_for_selector("#matches li")
  assert page.inner_text("#matches li:first-child").startswith(other)
  page.keyboard.press("Enter")
  expect(page.locator("#progress")).to_contain_text("decided 4 / 5")
  page.screenshot(path=str(_artifacts() / "review_page.png"))

  decided = {p: (d.status, d.label, d.reviewer)
             for p, d in site["store"].decisions().items()}
  rows = {r["id"]: r for r in site["rows"]}
  assert decided == {
      "p2": ("accepted", rows["p2"]["top_k"][0]["label"], "ann"),
      "p1": ("accepted", rows["p1"]["top_k"][1]["label"], "ann"),
      "p4": ("unclear", None, "ann"),
      "p0": ("relabelled", other, "ann")}

  page.reload()                                # Decisions are kept.
  page.wait_for_selector("body[data-ready='1']")
  assert "decided 4 / 5" in page.inner_text("#progress")
  assert _current_title(page) == "product number 3"  # The one left.
  assert page.locator("#list li.decided").count() == 4
  page.click("#list li[data-id='p0']")
  assert f"relabelled “{other}” by ann" in page.inner_text("#decision")


def test_a_second_reviewer_sees_the_first_decision_and_may_override(
    browser, site):
  page = browser.new_page()
  review_helpers.sign_in(page, site["url"], site["tokens"]["ben"])
  assert _current_title(page) == "product number 2"
  # Meanwhile ann decides the same product.
  r = requests.post(site["url"] + "/api/decisions", timeout=30, json={
      "product": "p2", "status": "unclear", "label": None, "base_version": 0},
                    headers={"Authorization": f"Bearer {site['tokens']['ann']}"})
  assert r.status_code == 200
  page.keyboard.press("Enter")                 # ben accepts the top label.
  page.wait_for_selector("#banner:not([hidden])")
  banner = page.inner_text("#banner")
  assert "Already unclear by ann" in banner and "was not saved" in banner
  assert site["store"].decision("p2").reviewer == "ann"
  page.click("#override")
  expect(page.locator("#progress")).to_contain_text("decided 1 / 5")
  current = site["store"].decision("p2")
  assert (current.reviewer, current.status, current.version) == (
      "ben", "accepted", 2)
  assert [h["reviewer"] for h in site["store"].history("p2")] == ["ann",
                                                                  "ben"]


# ------------------------------------------------- issue 32: defects found --


def test_a_save_while_the_database_is_busy_is_shown_and_retried(browser,
                                                                 site):
  import sqlite3  # pylint: disable=g-import-not-at-top
  site["store"].busy_timeout = 0.2
  page = browser.new_page()
  review_helpers.sign_in(page, site["url"], site["tokens"]["ann"])
  holder = sqlite3.connect(site["db"], isolation_level=None)
  holder.execute("BEGIN IMMEDIATE")  # Another program is writing.
  try:
    page.keyboard.press("Enter")
    expect(page.locator("#banner")).to_contain_text("busy", timeout=10_000)
    expect(page.locator("#banner")).to_contain_text("Saving again")
    assert site["store"].decisions() == {}
  finally:
    holder.execute("ROLLBACK")
    holder.close()
  expect(page.locator("#progress")).to_contain_text("decided 1 / 5",
                                                    timeout=10_000)
  expect(page.locator("#banner")).to_be_hidden()
  assert site["store"].decision("p2").reviewer == "ann"


def test_a_key_keeps_the_catalogue_label_outside_the_top_5(browser, site):
  page = browser.new_page()
  review_helpers.sign_in(page, site["url"], site["tokens"]["ann"])
  assert "catalogue label" in page.inner_text(".keys")
  page.click("#list li[data-id='p3']")
  shown = [e["label"] for e in site["rows"][3]["top_k"]]
  assert "watch" not in shown and "“watch”" in page.inner_text("#catalogue")
  page.keyboard.press("c")
  expect(page.locator("#progress")).to_contain_text("decided 1 / 5")
  d = site["store"].decision("p3")
  assert (d.status, d.label) == ("relabelled", "watch")


def test_the_list_marks_each_state_differently_and_explains_them(browser,
                                                                  site):
  page = browser.new_page()
  review_helpers.sign_in(page, site["url"], site["tokens"]["ann"])
  page.keyboard.press("Enter")                 # p2 accepted.
  expect(page.locator("#title")).to_have_text("product number 1")
  page.keyboard.press("/")                     # p1 relabelled.
  page.keyboard.type("sock")
  page.wait_for_selector("#matches li")
  page.keyboard.press("Enter")
  expect(page.locator("#title")).to_have_text("product number 4")
  page.keyboard.press("u")                     # p4 unclear.
  expect(page.locator("#progress")).to_contain_text("decided 3 / 5")
  marks = {pid: page.inner_text(f"#list li[data-id='{pid}'] .mark").strip()
           for pid in ("p2", "p1", "p4", "p0")}
  assert len(set(marks.values())) == 4, marks  # p0: undecided.
  legend = page.inner_text("#legend")
  for pid, word in (("p2", "accepted"), ("p1", "relabelled"),
                    ("p4", "unclear"), ("p0", "undecided")):
    assert f"{marks[pid]} {word}" in legend, (marks, legend)
  assert "abstained" in legend


def test_a_photo_frame_says_it_is_loading(browser, site):
  page = browser.new_page()
  held = []
  # Photos wait until released.
  page.route("**/api/photo/**", lambda route: held.append(route))
  review_helpers.sign_in(page, site["url"], site["tokens"]["ann"])
  expect(page.locator("#photo")).to_contain_text("loading photo")
  for route in held:
    route.continue_()
  expect(page.locator("#photo img")).to_be_visible()
  expect(page.locator("#photo")).not_to_contain_text("loading")
  page.unroute("**/api/photo/**")
  page.route("**/api/photo/**", lambda route: route.abort())
  page.keyboard.press("j")                     # p1: its photo fails.
  expect(page.locator("#photo")).to_contain_text("could not be loaded")


@pytest.mark.slow
def test_a_queue_of_100k_products_stays_quick(browser, tmp_path):
  """100,000 products, half decided: the page is usable and a key press or
  a decision answers quickly, drawing only the rows on screen. Slow (the
  score file and the index take a while to build on a shared machine);
  the bounds are generous, bench/bench_review.py measures."""
  import json  # pylint: disable=g-import-not-at-top
  import sqlite3  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from mic_jax.reviewing import store as store_lib  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import bundle  # pylint: disable=g-import-not-at-top
  n = 100_000
  export = review_helpers.fake_export(tmp_path / "export", LABELS)
  identity = bundle.identity(export)
  scores = tmp_path / "scores.jsonl"
  with open(scores, "w") as f:
    for i in range(n):
      p = (i * 7919 % n) / n
      f.write(json.dumps({
          "id": f"p{i}", "title": f"product number {i}", "label": "bag",
          "top_k": [{"label": "hat", "prob": p}, {"label": "bag",
                                                   "prob": 1 - p}],
          "abstain": i % 10 == 0, "export": identity, "photo": None}) + "\n")
  db = tmp_path / "review.sqlite"
  token = store_lib.Store(db).add_reviewer("ann")
  decided = [(f"p{i}", "accepted", "hat", "ann", identity, "2026-12-07", 1)
             for i in range(0, n, 2)]
  with sqlite3.connect(db) as con:
    con.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    decided)
    con.executemany("INSERT INTO history (product_id, status, label, "
                    "reviewer, export, decided_at, version, "
                    "replaced_version) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    decided)
  with review_helpers.review_server(scores, export, db) as (url, _):
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.goto(url + "/")
    page.fill("#token", token)
    start = time.perf_counter()
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")
    assert time.perf_counter() - start < 10
    assert "decided 50000 / 100000" in page.inner_text("#progress")
    assert page.evaluate("document.getElementsByTagName('*').length") < 500
    title = _current_title(page)
    assert int(title.split()[-1]) % 2 == 1  # Resumed on an undecided one.
    start = time.perf_counter()
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("decided 50001 / ")
    expect(page.locator("#title")).not_to_have_text(title)
    assert time.perf_counter() - start < 2
    title = _current_title(page)
    start = time.perf_counter()
    page.keyboard.press("j")
    expect(page.locator("#title")).not_to_have_text(title)
    expect(page.locator("#list li.current")).to_have_count(1)
    assert time.perf_counter() - start < 2
