// lookalike's page: send a photo (or a region of it) to POST search, show the products that look like it; a click
// asks for more like one; "find every product" asks POST search/regions. The parts: photo.js (the preview, the
// crop rectangle, region boxes), filters.js (filter controls -> where= clauses), results.js (the result cards).
// No framework and no network beyond this server. Text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);

// What the results on screen answer: the user's photo (with an optional box, in the photo's own pixels), or
// "more like" a product. Changing an option or a filter asks the same question again.
const current = { query: null, file: null, box: null };
const REGION_RESULTS = 3; // results per region: the product found and two runners-up

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("results").setAttribute("aria-busy", String(busy));
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (_) {
    // not JSON: fall through
  }
  return `${response.status} ${response.statusText}`;
}

// After an error the old results no longer answer anything: they go, so they cannot be taken for the answer.
function clearResults() {
  const list = $("results");
  list.replaceChildren();
  delete list.dataset.query;
  $("results-section").hidden = true;
  $("region-boxes").replaceChildren();
}

let latest = 0; // only the answer to the last request is shown (a slow answer must not overwrite a newer one)

async function call(url, options, onOk) {
  const ticket = ++latest;
  setBusy(true);
  try {
    const response = await fetch(url, options);
    if (ticket !== latest) return;
    if (!response.ok) {
      const text = await errorText(response);
      const retry = response.headers.get("Retry-After");
      clearResults();
      setStatus(retry ? `${text} (try again in ${retry} s)` : text, true);
      return;
    }
    const body = await response.json();
    if (ticket === latest) onOk(body);
  } catch (err) {
    if (ticket !== latest) return;
    clearResults();
    setStatus(`The server could not be reached (${err.message}).`, true);
  } finally {
    if (ticket === latest) setBusy(false);
  }
}

// --- asking --------------------------------------------------------------------------------------------------

function params(extra) {
  const out = new URLSearchParams(extra);
  for (const clause of whereClauses()) out.append("where", clause);
  return out;
}

const filtered = () => (whereClauses().length ? " (filtered)" : "");

function ask() {
  const q = current.query;
  if (!q) return;
  if (q.kind === "similar") moreLike(q.productId, q.name, null);
  else if ($("regions-mode").checked && current.file) searchRegions(current.file);
  else if (current.file) searchPhoto(current.file);
}

function photoForm(file) {
  const form = new FormData();
  form.append("image", file, file.name || "pasted-photo");
  return form;
}

function newPhoto(file) {
  if (!file) return;
  current.file = file;
  current.query = { kind: "photo" };
  showPreview(file);
  ask();
}

function searchPhoto(file) {
  const extra = {
    top_k: $("top-k").value,
    by_product: $("by-product").checked,
    only_matches: $("only-matches").checked,
  };
  if (current.box) extra.box = current.box.join(",");
  $("region-boxes").replaceChildren();
  setStatus(current.box ? "Searching the marked region…" : "Searching…");
  call(`search?${params(extra)}`, { method: "POST", body: photoForm(file) }, (data) => {
    const title = current.box ? "Products that look like the marked region" : "Products that look like your photo";
    render(data.results, title + filtered(), current.box ? "search-box" : "search");
    setStatus(`${data.results.length} result(s) in ${Math.round(data.timings.total_ms)} ms`);
  });
}

function searchRegions(file) {
  showBox(null);
  setStatus("Looking for every product in the photo…");
  const extra = { top_k: REGION_RESULTS };
  call(`search/regions?${params(extra)}`, { method: "POST", body: photoForm(file) }, (data) => {
    renderRegions(data.regions, filtered());
    showRegions(data.regions);
    setStatus(`${data.regions.length} region(s) in ${Math.round(data.timings.total_ms)} ms`);
  });
}

// "More like this" answers with other products by design, so the "no match" flags say nothing here: not shown.
function moreLike(productId, name, thumbnailUrl) {
  current.query = { kind: "similar", productId, name };
  if (thumbnailUrl) setPreview(thumbnailUrl, name, false);
  const extra = { top_k: $("top-k").value };
  setStatus(`Looking for products like ${name}…`);
  call(`products/${encodeURIComponent(productId)}/similar?${params(extra)}`, {}, (data) => {
    const results = data.results.map(({ match, ...rest }) => rest);
    render(results, `More like ${name}${filtered()}`, `similar:${productId}`);
    setStatus(`${results.length} product(s) like ${name}`);
  });
}

// "Only matches" needs a calibrated "no match" threshold; without one the index flags nothing: no such option.
async function showMatchOption() {
  try {
    const response = await fetch("stats");
    if (!response.ok) return;
    const stats = await response.json();
    $("only-matches-label").hidden = typeof stats.no_match_threshold !== "number";
  } catch (_) {
    // keep the option: the server says when it cannot use it
  }
}

// --- start ---------------------------------------------------------------------------------------------------

async function showIndex() {
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    if (response.ok) {
      $("index-info").textContent = `${body.images} catalog photos indexed`;
      showFilters();
      showMatchOption();
    } else {
      $("index-info").textContent = body.status === "failed" ? "the index failed to load" : "loading the index…";
      if (body.status !== "failed") setTimeout(showIndex, 2000);
    }
  } catch (_) {
    $("index-info").textContent = "";
  }
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    newPhoto(e.target.files[0]);
    e.target.value = "";
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("file").click();
    }
  });
  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    }),
  );
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    newPhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) {
      e.preventDefault();
      newPhoto(file);
    }
  });
  $("clear-box").addEventListener("click", async () => {
    await showBox(null);
    ask();
  });
  for (const id of ["top-k", "by-product", "only-matches", "regions-mode"]) $(id).addEventListener("change", ask);
  for (const id of ["filter-category", "filter-brand", "filter-tags", "filter-price"]) {
    $(id).addEventListener("change", ask);
  }
  $("clear-filters").addEventListener("click", clearFilters);
  watchDrags();
  showIndex();
});
