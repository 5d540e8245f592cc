// lookalike's page, the results: a card per hit (name, price, link, similarity, match badge), weak ones apart.
"use strict";

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
    // pointing at a region's results points out its box on the photo
    const box = () => document.querySelector(`#region-boxes .box[data-region="${i + 1}"]`);
    group.addEventListener("mouseenter", () => box()?.classList.add("active"));
    group.addEventListener("mouseleave", () => box()?.classList.remove("active"));
    return group;
  });
  list.replaceChildren(...groups);
  list.dataset.query = "regions";
  const title = `${regions.length} product(s) found in your photo${suffix}`;
  $("results-title").textContent = regions.length ? title : `No catalog product found in your photo${suffix}`;
  $("results-help").hidden = !regions.length;
  $("results-section").hidden = false;
}
