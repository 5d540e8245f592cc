// lookalike's page, the photo: its preview, the crop rectangle dragged on it, the boxes of the regions found.
"use strict";

const MIN_BOX_PX = 8; // a drag smaller than this (on screen) is a click, not a rectangle
const REGION_COLOURS = ["#e4572e", "#2f6fde", "#17a34a", "#a855f7", "#f59e0b", "#0891b2", "#db2777", "#65a30d"];

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
