// The review page: one product at a time, keyboard first.
// Plain JavaScript, no build step; talks to /api/* with the sign-in cookie.
//
// A queue may hold a million products: the page holds only the pages of it
// the reviewer looked at (PAGE products each, at most KEEP_PAGES of them)
// and draws only the list rows on screen (plus MARGIN), each ROW pixels
// high, so a key press or a decision touches a few dozen elements.
"use strict";

const PAGE = 200, KEEP_PAGES = 40, ROW = 28, MARGIN = 10;
const state = { total: 0, pages: new Map(), pending: new Map(), labels: [],
                index: 0, matches: [], match: 0 };
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { window.location.reload(); throw new Error("signed out"); }
  let body;
  try { body = await response.json(); } catch (e) {  // Not JSON (a proxy's page).
    body = { error: `the server answered ${response.status} ${response.statusText}` };
  }
  return { status: response.status, body };
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

function describe(d) {
  if (!d) return "";
  const what = d.status === "unclear" ? "unclear" : `${d.status} “${d.label}”`;
  return `${what} by ${d.reviewer} at ${d.decided_at.replace("T", " ")}`;
}

function showProgress(p) {
  $("progress").textContent =
    `decided ${p.decided} / ${p.total} · remaining ${p.remaining} · ` +
    `abstained: ${p.abstained_decided} / ${p.abstained} decided`;
}

// Which products the queue holds: the suspected label errors queue names
// its rule and how many of the scored products it kept.
function showSelection(sel) {
  if (!sel || sel.queue !== "suspected_label_errors") return;
  $("heading").textContent = "Suspected label errors";
  $("selection").textContent = `${sel.kept} of ${sel.considered} scored products kept`;
  $("selection").title = `Kept: ${sel.description}`;  // One header line; the rule on hover.
  $("selection").hidden = false;
}

// The product at position i (0-based; its rank is i + 1), if its page is here.
function productAt(i) {
  const page = state.pages.get(Math.floor(i / PAGE));
  return page ? page[i % PAGE] : undefined;
}

// Fetches page n of the queue once (a promise); forgets the pages
// farthest from the current product beyond KEEP_PAGES.
function loadPage(n) {
  if (state.pages.has(n)) return Promise.resolve();
  if (!state.pending.has(n)) {
    state.pending.set(n, api(`/api/queue?after=${n * PAGE}&limit=${PAGE}`).then(({ body }) => {
      state.pending.delete(n);
      if (!body.products) return;
      state.pages.set(n, body.products);
      state.total = body.total;
      const here = Math.floor(state.index / PAGE);
      while (state.pages.size > KEEP_PAGES) {
        let far = n;
        for (const k of state.pages.keys()) if (Math.abs(k - here) > Math.abs(far - here)) far = k;
        if (far === here) break;
        state.pages.delete(far);
      }
    }));
  }
  return state.pending.get(n);
}

function rowOf(i) {
  const p = productAt(i);
  const li = el("li", {});
  li.style.top = `${i * ROW}px`;
  if (!p) {
    li.append(el("span", { className: "mark", textContent: "" }), "…");
    return li;
  }
  const [mark, meaning] = markOf(p);
  li.title = `${meaning}: ${p.title}`;
  li.append(el("span", { className: "mark", textContent: mark }), p.title);
  li.dataset.id = p.id;
  if (p.decision) li.classList.add("decided", p.decision.status);
  if (i === state.index) li.classList.add("current");
  li.addEventListener("click", () => { go(i); });
  return li;
}

// Draws the rows on screen (and MARGIN more each side); fetches their pages.
function renderList() {
  const list = $("list"), nav = list.parentElement;
  list.style.height = `${state.total * ROW}px`;
  const first = Math.max(0, Math.floor(nav.scrollTop / ROW) - MARGIN);
  const last = Math.min(state.total, Math.ceil((nav.scrollTop + nav.clientHeight) / ROW) + MARGIN);
  const rows = [];
  for (let i = first; i < last; i++) rows.push(rowOf(i));
  list.replaceChildren(...rows);
  const missing = new Set();
  for (let i = first; i < last; i++) if (!productAt(i)) missing.add(Math.floor(i / PAGE));
  for (const n of missing) loadPage(n).then(renderList);
}

// Scrolls the list so that the current product's row is on screen.
function revealCurrent() {
  const nav = $("list").parentElement;
  const top = state.index * ROW, list = $("list").offsetTop;
  if (top + list < nav.scrollTop) nav.scrollTop = top + list;
  else if (top + list + ROW > nav.scrollTop + nav.clientHeight) {
    nav.scrollTop = top + list + ROW - nav.clientHeight;
  }
}

// The list's mark of a product and what it means (the legend says the same).
const MARKS = {
  accepted: ["✓", "accepted"], relabelled: ["✎", "relabelled"], unclear: ["?", "unclear"],
  abstained: ["!", "abstained, undecided"], undecided: ["·", "undecided"] };

function markOf(p) {
  if (p.decision) return MARKS[p.decision.status] || MARKS.accepted;
  return p.abstain ? MARKS.abstained : MARKS.undecided;
}

// The photo, with a hint while it loads and a note if it cannot be.
function photoOf(p) {
  if (!p.photo) return [el("span", { className: "none", textContent: "no photo" })];
  const hint = el("span", { className: "loading", textContent: "loading photo…" });
  const img = el("img", { src: `/api/photo/${encodeURIComponent(p.id)}`, alt: p.title });
  img.hidden = true;
  img.addEventListener("load", () => { hint.remove(); img.hidden = false; });
  img.addEventListener("error", () => { hint.textContent = "the photo could not be loaded"; });
  return [hint, img];
}

// Keeps the catalogue's label, in the top 5 or not ("c").
function keepCatalogue() {
  const p = productAt(state.index);
  if (!p || !p.label || !state.labels.some((l) => l.label === p.label)) return;
  decide(p.top_k.some((e) => e.label === p.label) ? "accepted" : "relabelled", p.label);
}

function renderCard() {
  const p = productAt(state.index);
  if (!p) {
    $("title").textContent = state.total ? "loading…" : "Nothing to review.";
    if (state.total) loadPage(Math.floor(state.index / PAGE)).then(renderCard);
    return;
  }
  const figure = $("photo");
  figure.replaceChildren(...photoOf(p));
  $("title").textContent = p.title;
  $("pid").textContent = `id ${p.id}`;
  const labelProb = p.label_prob === undefined ? "" : ` (p ${(p.label_prob * 100).toFixed(1)}%)`;
  $("catalogue").textContent = p.label ? `· catalogue label “${p.label}”${labelProb}` : "";
  $("keep").hidden = !(p.label && state.labels.some((l) => l.label === p.label));
  $("abstain").replaceChildren(p.abstain ? el("span", { className: "badge", textContent: "model abstained" }) : "");
  const chosen = p.decision && p.decision.label;
  $("topk").replaceChildren(...p.top_k.map((e, i) => {
    const button = el("button", { type: "button" },
      el("kbd", { textContent: String(i + 1) }),
      el("span", {}, e.label, el("span", { className: "path", textContent: e.path || "" }),
         el("span", { className: "bar", style: `width:${Math.round(e.prob * 100)}%` })),
      el("span", { className: "prob", textContent: `${(e.prob * 100).toFixed(1)}%` }));
    button.addEventListener("click", () => decide("accepted", e.label));
    const li = el("li", {}, button);
    if (chosen === e.label) li.classList.add("chosen");
    return li;
  }));
  $("decision").textContent = p.decision ? `Decided: ${describe(p.decision)}` : "";
}

function render() { revealCurrent(); renderList(); renderCard(); }

function go(i) {
  state.index = Math.max(0, Math.min(state.total - 1, i));
  hideBanner();
  render();
}

// The position of the next undecided product after the current one: from
// the pages here, else asked of the server (wrapping round to the start).
async function nextUndecided() {
  const from = state.index;
  for (let i = from + 1; i < state.total && productAt(i); i++) {
    if (!productAt(i).decision) return i;
  }
  for (const after of [from + 1, 0]) {
    const { body } = await api(`/api/queue?after=${after}&limit=1&undecided=1`);
    if (body.products && body.products.length) return body.products[0].rank - 1;
  }
  return Math.min(from + 1, state.total - 1);
}

function hideBanner() { $("banner").hidden = true; $("banner").replaceChildren(); }

function showBanner(...children) {
  $("banner").replaceChildren(...children);
  $("banner").hidden = false;
}

function decide(status, label, baseVersion) {
  const p = productAt(state.index);
  if (p) save(p, status, label, baseVersion, 0);
}

// Saves a decision on product p; on a 503 (another program holds the
// database) says so and saves again, even if the reviewer moved on.
async function save(p, status, label, baseVersion, attempt) {
  const base = baseVersion !== undefined ? baseVersion : (p.decision ? p.decision.version : 0);
  const { status: code, body } = await api("/api/decisions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ product: p.id, status, label: status === "unclear" ? null : label,
                           base_version: base }) });
  if (code === 503) {
    const wait = Math.max(1, Number(body.retry_after) || 1);
    showBanner(`Not saved yet (“${p.title}”): ${body.error}. ` +
               `Saving again in ${wait} s (attempt ${attempt + 1})…`);
    setTimeout(() => save(p, status, label, base, attempt + 1), wait * 1000);
    return;
  }
  const here = state.index === p.rank - 1;
  if (code === 409 && body.current) {  // Someone else decided it: show theirs, offer to override.
    p.decision = body.current;
    if (!here) go(p.rank - 1);
    render();
    const override = el("button", { type: "button", id: "override", textContent: "Override with mine" });
    override.addEventListener("click", () => { hideBanner(); save(p, status, label, body.current.version, 0); });
    showBanner(`Already ${describe(body.current)}. Yours (${status}${label && status !== "unclear" ? ` “${label}”` : ""}) was not saved.`, override);
    return;
  }
  if (code !== 200) {
    showBanner(`Not saved (“${p.title}”): ${body.error}`);
    return;
  }
  p.decision = body.decision;
  showProgress(body.progress);
  hideBanner();
  if (here) {
    const next = await nextUndecided();
    if (state.index === p.rank - 1) state.index = next;  // Unless they moved on.
    await loadPage(Math.floor(state.index / PAGE));
  }
  render();
}

// ------------------------------------------------------------ search --

function search(text) {
  const q = text.trim().toLowerCase();
  state.matches = q ? state.labels.filter(
    (l) => l.label.toLowerCase().includes(q) || l.path.toLowerCase().includes(q)).slice(0, 20) : [];
  state.match = 0;
  renderMatches();
}

function renderMatches() {
  $("matches").replaceChildren(...state.matches.map((m, i) => {
    const li = el("li", { role: "option" }, m.label, el("span", { className: "path", textContent: m.path }));
    li.setAttribute("aria-selected", String(i === state.match));
    li.addEventListener("mousedown", (event) => { event.preventDefault(); pick(i); });
    return li;
  }));
}

function pick(i) {
  const m = state.matches[i];
  if (!m) return;
  const p = productAt(state.index);
  if (!p) return;
  const status = p.top_k.some((e) => e.label === m.label) ? "accepted" : "relabelled";
  $("search").value = "";
  search("");
  $("search").blur();
  decide(status, m.label);
}

function onSearchKey(event) {
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    const n = state.matches.length;
    if (n) state.match = (state.match + (event.key === "ArrowDown" ? 1 : n - 1)) % n;
    renderMatches();
  } else if (event.key === "Enter") {
    event.preventDefault();
    pick(state.match);
  } else if (event.key === "Escape") {
    $("search").value = ""; search(""); $("search").blur();
  }
}

// ---------------------------------------------------------- keyboard --

function onKey(event) {
  if (event.target === $("search") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.tagName === "BUTTON" && event.key === "Enter") return;  // The button's own click.
  const p = productAt(state.index);
  const k = event.key;
  if (!p && k !== "j" && k !== "k") return;
  if (k === "Enter" || (k >= "1" && k <= "9")) {
    const i = k === "Enter" ? 0 : Number(k) - 1;
    if (p.top_k[i]) { event.preventDefault(); decide("accepted", p.top_k[i].label); }
  } else if (k === "c") {
    event.preventDefault(); keepCatalogue();
  } else if (k === "u") {
    event.preventDefault(); decide("unclear", null);
  } else if (k === "/") {
    event.preventDefault(); $("search").focus();
  } else if (k === "j" || k === "ArrowDown" || k === "ArrowRight") {
    event.preventDefault(); go(state.index + 1);
  } else if (k === "k" || k === "ArrowUp" || k === "ArrowLeft") {
    event.preventDefault(); go(state.index - 1);
  }
}

async function start() {
  const [queue, labels] = await Promise.all([api(`/api/queue?limit=${PAGE}`), api("/api/labels")]);
  state.total = queue.body.total;
  state.pages.set(0, queue.body.products);
  state.labels = labels.body.labels;
  $("who").textContent = `signed in as ${queue.body.reviewer} · model ${queue.body.model} ${queue.body.export.slice(0, 12)}`;
  showProgress(queue.body.progress);
  showSelection(queue.body.selection);
  state.index = queue.body.resume ? queue.body.resume - 1 : 0;  // Where the reviewer stopped.
  await loadPage(Math.floor(state.index / PAGE));
  render();
  let drawing = false;
  $("list").parentElement.addEventListener("scroll", () => {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => { drawing = false; renderList(); });
  });
  document.addEventListener("keydown", onKey);
  $("search").addEventListener("input", (e) => search(e.target.value));
  $("search").addEventListener("keydown", onSearchKey);
  $("unclear").addEventListener("click", () => decide("unclear", null));
  $("keep").addEventListener("click", keepCatalogue);
  document.body.dataset.ready = "1";  // For tests: the page is usable.
}

start();
