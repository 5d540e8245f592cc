// lookalike's page, the filters: controls built from GET facets, read back as where= clauses.
"use strict";

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
