// lookalike's page: send a photo (or a region of it) to POST search, show the products that look like it; a click
// asks for more like one; "find every product" asks POST search/regions and draws each region on the photo.
// No framework and no network beyond this server. Text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const MIN_BOX_PX = 8;
const REGION_RESULTS = 3; // results per region: the product found and two runners-up // a drag smaller than this (on screen) is a click, not a rectangle
const REGION_COLOURS = ["#e4572e", "#2f6fde", "#17a34a", "#a855f7", "#f59e0b", "#0891b2", "#db2777", "#65a30d"];

// What the results on screen answer: the user's photo (with an optional box, in the photo's own pixels), or
// "more like" a product. Changing an option or a filter asks the same question again.
const current = { query: null, file: null, box: null };

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

// --- the photo: preview, crop rectangle, region boxes ----------------------------------------------------------

// The preview shows what the results are like: the photo searched with, or the product asked about.
function setPreview(src, alt, ownPhoto) {
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.alt = alt;
  img.onerror = clearPreview; // a file the browser cannot draw (a PDF, a broken JPEG): no broken-image icon
  img.src = src;
  img.hidden = false;
  $("photo").hidden = false;
  $("stage").classList.toggle("drawable", ownPhoto);
  $("photo-help").hidden = !ownPhoto;
  $("drop").classList.add("has-photo");
  showBox(null);
  $("region-boxes").replaceChildren();
}

function clearPreview() {
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.onerror = null;
  img.removeAttribute("src");
  img.hidden = true;
  $("photo").hidden = true;
  $("drop").classList.remove("has-photo");
  showBox(null);
  $("region-boxes").replaceChildren();
}

function showPreview(file) {
  if (file.type && !file.type.startsWith("image/")) {
    clearPreview();
    return;
  }
  setPreview(URL.createObjectURL(file), "your photo", true);
}

async function photoSize() {
  const img = $("preview");
  if (!img.complete || !img.naturalWidth) {
    try {
      await img.decode();
    } catch (_) {
      return null;
    }
  }
  return img.naturalWidth ? { width: img.naturalWidth, height: img.naturalHeight } : null;
}

// Boxes are placed in percent of the photo, so they stay on the product whatever size the photo is drawn at.
function place(el, box, size) {
  const [x0, y0, x1, y1] = box;
  el.style.left = `${(100 * x0) / size.width}%`;
  el.style.top = `${(100 * y0) / size.height}%`;
  el.style.width = `${(100 * (x1 - x0)) / size.width}%`;
  el.style.height = `${(100 * (y1 - y0)) / size.height}%`;
}

async function showBox(box) {
  const el = $("box");
  current.box = box;
  $("clear-box").hidden = box === null;
  el.hidden = true;
  if (box === null) return;
  const size = await photoSize();
  if (!size || current.box !== box) return;
  place(el, box, size);
  el.hidden = false;
}

async function showRegions(regions) {
  const layer = $("region-boxes");
  layer.replaceChildren();
  const size = await photoSize();
  if (!size) return;
  regions.forEach((region, i) => {
    const el = document.createElement("div");
    el.className = "box region";
    el.dataset.region = String(i + 1);
    el.style.setProperty("--colour", REGION_COLOURS[i % REGION_COLOURS.length]);
    const label = document.createElement("span");
    label.textContent = String(i + 1);
    el.append(label);
    place(el, region.box, size);
    layer.append(el);
  });
}

// Drag on the user's own photo: the rectangle, in the photo's pixels, becomes the box of the next search.
function watchDrags() {
  const stage = $("stage");
  const el = $("box");
  let start = null;
  const point = (e) => {
    const rect = $("preview").getBoundingClientRect();
    return {
      x: Math.min(Math.max(e.clientX - rect.left, 0), rect.width),
      y: Math.min(Math.max(e.clientY - rect.top, 0), rect.height),
      rect,
    };
  };
  const drawn = (a, b) => ({
    x0: Math.min(a.x, b.x),
    y0: Math.min(a.y, b.y),
    x1: Math.max(a.x, b.x),
    y1: Math.max(a.y, b.y),
  });
  stage.addEventListener("pointerdown", (e) => {
    if (!stage.classList.contains("drawable") || e.button !== 0) return;
    e.preventDefault();
    start = point(e);
    stage.setPointerCapture(e.pointerId);
    $("region-boxes").replaceChildren();
  });
  stage.addEventListener("pointermove", (e) => {
    if (!start) return;
    const r = drawn(start, point(e));
    const { width, height } = start.rect;
    place(el, [r.x0, r.y0, r.x1, r.y1], { width, height });
    el.hidden = false;
  });
  const finish = async (e) => {
    if (!start) return;
    const a = start;
    start = null;
    const r = drawn(a, point(e));
    if (r.x1 - r.x0 < MIN_BOX_PX || r.y1 - r.y0 < MIN_BOX_PX) {
      showBox(current.box); // a click: keep whatever box there was
      return;
    }
    const size = await photoSize();
    if (!size) return;
    const sx = size.width / a.rect.width;
    const sy = size.height / a.rect.height;
    const box = [
      Math.round(r.x0 * sx),
      Math.round(r.y0 * sy),
      Math.min(size.width, Math.round(r.x1 * sx)),
      Math.min(size.height, Math.round(r.y1 * sy)),
    ];
    $("regions-mode").checked = false; // a rectangle asks about one product
    await showBox(box);
    ask();
  };
  stage.addEventListener("pointerup", finish);
  stage.addEventListener("pointercancel", () => {
    start = null;
    showBox(current.box);
  });
}

// --- filters -------------------------------------------------------------------------------------------------

const escapeValue = (text) => text.replaceAll("\\", "\\\\").replaceAll(",", "\\,");

// The filter controls as where= clauses (the server's grammar: field=value, field<=number, field~tag).
function whereClauses() {
  if ($("filters").hidden) return [];
  const out = [];
  for (const id of ["filter-category", "filter-brand"]) {
    const select = $(id);
    if (select.value) out.push(`${select.dataset.field}=${escapeValue(select.value)}`);
  }
  if ($("filter-tags").value) out.push(`tags~${escapeValue($("filter-tags").value)}`);
  const price = $("filter-price").value.trim();
  if (price !== "" && Number.isFinite(Number(price))) out.push(`price<=${Number(price)}`);
  for (const control of $("filter-attributes").querySelectorAll("[data-field]")) {
    const { field, op } = control.dataset;
    if (control.type === "checkbox") {
      if (control.checked) out.push(`${field}=true`);
    } else if (control.type === "number") {
      const value = control.value.trim();
      if (value !== "" && Number.isFinite(Number(value))) out.push(`${field}<=${Number(value)}`);
    } else if (control.value) {
      out.push(`${field}${op}${escapeValue(control.value)}`);
    }
  }
  return out;
}

// A control for each further column of the records: a tick for yes/no, a select for a few values, "at most" for
// numbers. Built from GET facets, so only fields the catalog has appear.
function attributeControl(facet) {
  const label = document.createElement("label");
  const title = facet.field.replaceAll("_", " ");
  let control;
  if (facet.kind === "bool") {
    control = document.createElement("input");
    control.type = "checkbox";
    label.append(control, ` ${title}`);
  } else if (facet.kind === "number") {
    control = document.createElement("input");
    control.type = "number";
    control.step = "any";
    control.placeholder = `up to ${facet.max}`;
    label.append(`${title} at most `, control);
  } else if (facet.values && facet.values.length) {
    control = document.createElement("select");
    const any = document.createElement("option");
    any.value = "";
    any.textContent = "any";
    control.append(any);
    for (const { value, count } of facet.values) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = `${value} (${count})`;
      control.append(option);
    }
    control.dataset.op = facet.kind === "list" ? "~" : "=";
    label.append(`${title} `, control);
  } else {
    return null;
  }
  control.dataset.field = facet.field;
  control.addEventListener("change", ask);
  return label;
}

function fillSelect(id, values) {
  const select = $(id);
  const options = values.map(({ value, count }) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = `${value} (${count})`;
    return option;
  });
  select.replaceChildren(select.options[0], ...options);
  $(`${id}-label`).hidden = values.length === 0;
  return values.length > 0;
}

async function showFilters() {
  let facets;
  try {
    const response = await fetch("facets");
    if (!response.ok) return;
    facets = await response.json();
  } catch (_) {
    return;
  }
  if (!facets.with_records) return;
  let any = fillSelect("filter-category", facets.category);
  any = fillSelect("filter-brand", facets.brand) || any;
  any = fillSelect("filter-tags", facets.tags) || any;
  if (facets.price) {
    const input = $("filter-price");
    input.max = String(facets.price.max);
    input.placeholder = `up to ${formatPrice(facets.price.max, facets.price.currencies[0])}`;
    $("filter-price-label").hidden = false;
    any = true;
  }
  const controls = (facets.attributes || []).map(attributeControl).filter(Boolean);
  $("filter-attributes").replaceChildren(...controls);
  $("filters").hidden = !(any || controls.length);
}

function clearFilters() {
  for (const id of ["filter-category", "filter-brand", "filter-tags"]) $(id).value = "";
  $("filter-price").value = "";
  for (const control of $("filter-attributes").querySelectorAll("[data-field]")) {
    if (control.type === "checkbox") control.checked = false;
    else control.value = "";
  }
  ask();
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

// --- results -------------------------------------------------------------------------------------------------

function formatPrice(price, currency) {
  if (typeof price !== "number") return "";
  if (currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(price);
    } catch (_) {
      return `${price.toFixed(2)} ${currency}`;
    }
  }
  return price.toFixed(2);
}

const isWebLink = (url) => typeof url === "string" && /^https?:\/\//i.test(url);

function card(hit) {
  const record = hit.record || {};
  const title = record.name || hit.product_id;
  const item = document.createElement("li");
  item.className = "result";
  if (hit.match === false) item.classList.add("weak");

  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.product = hit.product_id;
  button.title = `More like ${title}`;

  const img = document.createElement("img");
  img.src = hit.thumbnail_url;
  img.alt = title;
  img.loading = "lazy";

  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  button.append(img, rank);

  if (hit.match === true || hit.match === false) {
    const badge = document.createElement("span");
    badge.className = `badge ${hit.match ? "match" : "no-match"}`;
    badge.textContent = hit.match ? "match" : "weak";
    badge.title = hit.match ? "Above the calibrated “no match” threshold" : "Below the “no match” threshold";
    button.append(badge);
  }

  const name = document.createElement("span");
  name.className = "product";
  name.textContent = title;
  button.append(name);
  if (record.name) {
    const id = document.createElement("span");
    id.className = "product-id muted";
    id.textContent = hit.product_id;
    button.append(id);
  }
  if (typeof record.price === "number") {
    const price = document.createElement("span");
    price.className = "price";
    price.textContent = formatPrice(record.price, record.currency);
    button.append(price);
  }

  const score = document.createElement("span");
  score.className = "similarity";
  const meter = document.createElement("meter");
  meter.min = 0;
  meter.max = 1;
  meter.value = Math.max(0, hit.similarity);
  const number = document.createElement("span");
  number.textContent = hit.similarity.toFixed(3);
  score.append(meter, number);
  button.append(score);
  button.addEventListener("click", () => moreLike(hit.product_id, title, hit.thumbnail_url));
  item.append(button);

  if (isWebLink(record.url)) {
    const link = document.createElement("a");
    link.className = "shop-link";
    link.href = record.url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.textContent = "View product ↗";
    item.append(link);
  }
  return item;
}

// Confident results first; those below the "no match" threshold after a line (unless told not to), dimmed.
function cards(results, { line = true } = {}) {
  const strong = results.filter((h) => h.match !== false);
  const weak = results.filter((h) => h.match === false);
  const out = strong.map(card);
  if (weak.length && !line) {
    out.push(...weak.map(card));
  } else if (weak.length) {
    const line = document.createElement("li");
    line.className = "weak-line";
    line.textContent = strong.length
      ? "Weak matches: below the “no match” threshold, probably not your product"
      : "No confident match: probably not in the catalog. The closest products:";
    out.push(line, ...weak.map(card));
  }
  return out;
}

function render(results, title, query) {
  const list = $("results");
  list.replaceChildren(...cards(results));
  list.dataset.query = query;
  $("results-title").textContent = results.length ? title : `${title}: no match`;
  $("results-help").hidden = !results.length;
  $("results-section").hidden = false;
}

function renderRegions(regions, suffix) {
  const list = $("results");
  const groups = regions.map((region, i) => {
    const group = document.createElement("li");
    group.className = "region-group";
    group.dataset.region = String(i + 1);
    group.style.setProperty("--colour", REGION_COLOURS[i % REGION_COLOURS.length]);
    const heading = document.createElement("h3");
    const label = document.createElement("span");
    label.className = "region-label";
    label.textContent = String(i + 1);
    const top = region.hits[0];
    const name = top ? (top.record && top.record.name) || top.product_id : "";
    heading.append(label, ` ${name}`);
    const where = document.createElement("span");
    where.className = "muted";
    where.textContent = ` box ${region.box.join(", ")}`;
    heading.append(where);
    const grid = document.createElement("ol");
    grid.className = "grid";
    grid.replaceChildren(...cards(region.hits, { line: false }));
    group.append(heading, grid);
    return group;
  });
  list.replaceChildren(...groups);
  list.dataset.query = "regions";
  const title = `${regions.length} product(s) found in your photo${suffix}`;
  $("results-title").textContent = regions.length ? title : `No catalog product found in your photo${suffix}`;
  $("results-help").hidden = !regions.length;
  $("results-section").hidden = false;
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
