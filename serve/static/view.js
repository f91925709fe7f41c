// The view of the image: zoom, pan, window resizes, and the marks drawn over it (an SVG in
// image pixels, so zoom and resizes move the marks with their objects).

import { $, MARK_PX, SVG, state } from "./state.js";

// --- the view: zoom, pan, resize --------------------------------------------------------

export function fitView() {
  const rect = $("view").getBoundingClientRect();
  if (!state.width || !rect.width) return;
  const scale = Math.min(rect.width / state.width, rect.height / state.height) * 0.96;
  state.view = {
    scale,
    x: (rect.width - state.width * scale) / 2,
    y: (rect.height - state.height * scale) / 2,
    fit: true,
  };
  applyView();
}

export function zoomAt(factor, sx, sy) {
  const v = state.view;
  const scale = Math.max(0.02, Math.min(64, v.scale * factor));
  const k = scale / v.scale;
  state.view = { scale, x: sx - (sx - v.x) * k, y: sy - (sy - v.y) * k, fit: false };
  applyView();
}

export function zoomKey(factor) {
  const c = state.cursor ? toScreen(state.cursor.x, state.cursor.y) : null;
  const rect = $("view").getBoundingClientRect();
  zoomAt(factor, c ? c.x : rect.width / 2, c ? c.y : rect.height / 2);
}

export function panBy(dx, dy) {
  state.view.x += dx;
  state.view.y += dy;
  state.view.fit = false;
  applyView();
}

export function applyView() {
  const { scale, x, y } = state.view;
  $("stage").style.transform = `translate(${x}px, ${y}px) scale(${scale})`;
  // Marks keep their size on screen: their radius and text are in image pixels.
  const marks = $("marks");
  marks.setAttribute("font-size", String(12 / scale));
  marks.setAttribute("stroke-width", String(1.5 / scale));
  for (const circle of marks.querySelectorAll("circle")) circle.setAttribute("r", String(MARK_PX / scale));
  for (const text of marks.querySelectorAll("text")) placeLabel(text);
  $("boxes").setAttribute("stroke-width", String(2 / scale));
  drawCursor();
}

export function toImage(clientX, clientY) {
  const rect = $("view").getBoundingClientRect();
  const { scale, x, y } = state.view;
  return { x: (clientX - rect.left - x) / scale, y: (clientY - rect.top - y) / scale };
}

export function toScreen(ix, iy) {
  const { scale, x, y } = state.view;
  return { x: ix * scale + x, y: iy * scale + y };
}

export function keepCursorInView() {
  const rect = $("view").getBoundingClientRect();
  const p = toScreen(state.cursor.x, state.cursor.y);
  const margin = 30;
  let dx = 0;
  let dy = 0;
  if (p.x < margin) dx = margin - p.x;
  if (p.x > rect.width - margin) dx = rect.width - margin - p.x;
  if (p.y < margin) dy = margin - p.y;
  if (p.y > rect.height - margin) dy = rect.height - margin - p.y;
  if (dx || dy) panBy(dx, dy);
}

// When the window changes size the view keeps what it showed: fitted stays fitted, otherwise
// the image point at the centre stays at the centre. Marks live in image pixels, on the image.
export function watchResize() {
  let lastSize = null;
  new ResizeObserver(() => {
    const rect = $("view").getBoundingClientRect();
    if (state.view.fit) fitView();
    else if (lastSize) panBy((rect.width - lastSize.width) / 2, (rect.height - lastSize.height) / 2);
    lastSize = { width: rect.width, height: rect.height };
  }).observe($("view"));
}

// --- drawing ----------------------------------------------------------------------------

export function addMark(i) {
  const p = state.points[i];
  const circle = document.createElementNS(SVG, "circle");
  circle.setAttribute("cx", p.x);
  circle.setAttribute("cy", p.y);
  circle.setAttribute("r", String(MARK_PX / state.view.scale));
  if (p.by === "person") circle.classList.add("person");
  if (i === state.selected) circle.classList.add("selected");
  const text = document.createElementNS(SVG, "text");
  text.textContent = String(i + 1);
  text.dataset.x = p.x;
  text.dataset.y = p.y;
  placeLabel(text);
  $("marks").append(circle, text);
}

function placeLabel(text) {
  const offset = (MARK_PX + 2) / state.view.scale;
  text.setAttribute("x", String(Number(text.dataset.x) + offset));
  text.setAttribute("y", String(Number(text.dataset.y) - offset));
}

export function rect(x1, y1, x2, y2, drawing = false) {
  const r = document.createElementNS(SVG, "rect");
  r.setAttribute("x", Math.min(x1, x2));
  r.setAttribute("y", Math.min(y1, y2));
  r.setAttribute("width", Math.abs(x2 - x1));
  r.setAttribute("height", Math.abs(y2 - y1));
  if (drawing) r.classList.add("drawing");
  return r;
}

export function drawCursor() {
  const g = $("cursor");
  g.hidden = !state.cursor || !state.keyboard;
  if (g.hidden) return;
  const { x, y } = state.cursor;
  const arm = 14 / state.view.scale;
  const set = (el, a) => Object.entries(a).forEach(([k, v]) => el.setAttribute(k, v));
  set($("cursor-h"), { x1: x - arm, x2: x + arm, y1: y, y2: y, "stroke-width": 1.5 / state.view.scale });
  set($("cursor-v"), { x1: x, x2: x, y1: y - arm, y2: y + arm, "stroke-width": 1.5 / state.view.scale });
}


/** Draw every point and exemplar box of the state anew. */
export function drawAll() {
  $("marks").replaceChildren();
  state.points.forEach((_, i) => addMark(i));
  $("boxes").replaceChildren();
  for (const [x1, y1, x2, y2] of state.boxes) $("boxes").append(rect(x1, y1, x2, y2));
  applyView();
}
