// lookalike's page: send a photo to POST search, show the products that look like it; a click asks for more like one.
// No framework and no network beyond this server. Text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);

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
}

async function call(url, options, onOk) {
  setBusy(true);
  try {
    const response = await fetch(url, options);
    if (!response.ok) {
      const text = await errorText(response);
      const retry = response.headers.get("Retry-After");
      clearResults();
      setStatus(retry ? `${text} (try again in ${retry} s)` : text, true);
      return;
    }
    onOk(await response.json());
  } catch (err) {
    clearResults();
    setStatus(`The server could not be reached (${err.message}).`, true);
  } finally {
    setBusy(false);
  }
}

// The preview shows what the results are like: the photo searched with, or the product asked about.
function setPreview(src, alt) {
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.alt = alt;
  img.onerror = clearPreview; // a file the browser cannot draw (a PDF, a broken JPEG): no broken-image icon
  img.src = src;
  img.hidden = false;
  $("drop").classList.add("has-photo");
}

function clearPreview() {
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.onerror = null;
  img.removeAttribute("src");
  img.hidden = true;
  $("drop").classList.remove("has-photo");
}

function showPreview(file) {
  if (file.type && !file.type.startsWith("image/")) {
    clearPreview();
    return;
  }
  setPreview(URL.createObjectURL(file), "your photo");
}

function searchPhoto(file) {
  if (!file) return;
  showPreview(file);
  const form = new FormData();
  form.append("image", file, file.name || "pasted-photo");
  const params = new URLSearchParams({ top_k: $("top-k").value, by_product: $("by-product").checked });
  setStatus("Searching…");
  call(`search?${params}`, { method: "POST", body: form }, (data) => {
    render(data.results, "Products that look like your photo", "search");
    setStatus(`${data.results.length} result(s) in ${Math.round(data.timings.total_ms)} ms`);
  });
}

function moreLike(productId, thumbnailUrl) {
  if (thumbnailUrl) setPreview(thumbnailUrl, productId);
  const params = new URLSearchParams({ top_k: $("top-k").value });
  setStatus(`Looking for products like ${productId}…`);
  call(`products/${encodeURIComponent(productId)}/similar?${params}`, {}, (data) => {
    render(data.results, `More like ${productId}`, `similar:${productId}`);
    setStatus(`${data.results.length} product(s) like ${productId}`);
  });
}

function card(hit) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.product = hit.product_id;
  button.title = `More like ${hit.product_id}`;

  const img = document.createElement("img");
  img.src = hit.thumbnail_url;
  img.alt = hit.product_id;
  img.loading = "lazy";

  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;

  const name = document.createElement("span");
  name.className = "product";
  name.textContent = hit.product_id;

  const score = document.createElement("span");
  score.className = "similarity";
  const meter = document.createElement("meter");
  meter.min = 0;
  meter.max = 1;
  meter.value = Math.max(0, hit.similarity);
  const number = document.createElement("span");
  number.textContent = hit.similarity.toFixed(3);
  score.append(meter, number);

  button.append(img, rank, name, score);
  button.addEventListener("click", () => moreLike(hit.product_id, hit.thumbnail_url));
  const item = document.createElement("li");
  item.append(button);
  return item;
}

function render(results, title, query) {
  const list = $("results");
  list.replaceChildren(...results.map(card));
  list.dataset.query = query;
  $("results-title").textContent = results.length ? title : `${title}: no match`;
  $("results-section").hidden = false;
}

async function showIndex() {
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    if (response.ok) {
      $("index-info").textContent = `${body.images} catalog photos indexed`;
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
    searchPhoto(e.target.files[0]);
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
    searchPhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) {
      e.preventDefault();
      searchPhoto(file);
    }
  });
  showIndex();
});
