// The counting page: open an image, watch the model find objects one by one, correct it, let
// it continue from the corrected points, export or save. It speaks only the public HTTP API:
// GET /info, POST /predict/stream (NDJSON, with the points so far when continuing), POST
// /collect. state.js holds what the page knows, view.js draws it; this module reads the
// person's moves and talks to the server.

import { $, DRAG_PX, HIT_PX, KEY_STEP_PX, state } from "./state.js";
import {
  addMark, applyView, drawAll, drawCursor, fitView, keepCursorInView, rect, toImage,
  watchResize, zoomAt, zoomKey,
} from "./view.js";

window.seqops = state; // for the browser tests and the curious

// --- the server -------------------------------------------------------------------------

function headers() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  if (response.status === 401) {
    askForKey();
    throw new Error("the server wants an API key: enter it above");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const detail = body.detail;
    if (Array.isArray(detail)) {
      return detail.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    }
    return `${response.status}: ${detail}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

async function loadInfo() {
  try {
    const response = await api("/info");
    state.info = await response.json();
  } catch (error) {
    $("model").textContent = `not ready: ${error.message}`;
    if (!$("key-form").hidden) return;
    setTimeout(loadInfo, 1000); // loading: ask again
    return;
  }
  const { model, exemplars, collect } = state.info;
  $("model").textContent =
    `model ${model.name}, version ${model.version}, on ${model.provider}` +
    (exemplars ? " · counts what 1–3 exemplar boxes show" : "");
  $("exemplar-mode").hidden = !exemplars;
  $("save").hidden = !collect;
  document.body.dataset.ready = "true";
  refresh();
  if (state.width && !state.undo.length && !exemplars) count(); // an image opened meanwhile
}

// --- opening an image -------------------------------------------------------------------

function openFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    say(`Not an image: ${file ? file.type || file.name : "nothing"} was given.`, "error");
    return;
  }
  stopCount();
  state.timings = { opened: performance.now() };
  document.body.dataset.state = "loading";
  state.file = file;
  state.name = file.name || "pasted-image.png";
  const image = $("image");
  URL.revokeObjectURL(image.src);
  image.onload = () => {
    // <img> applies the EXIF orientation (image-orientation: from-image), so the natural
    // size is that of the image as shown: the frame of the server's points.
    state.width = image.naturalWidth;
    state.height = image.naturalHeight;
    for (const el of [image, $("overlay")]) {
      el.setAttribute("width", state.width);
      el.setAttribute("height", state.height);
    }
    $("overlay").setAttribute("viewBox", `0 0 ${state.width} ${state.height}`);
    state.points = [];
    state.boxes = [];
    state.undo = [];
    state.redo = [];
    state.confidence = null;
    state.cursor = { x: state.width / 2, y: state.height / 2 };
    state.selected = -1;
    state.view.fit = true;
    document.body.dataset.state = "loaded";
    $("image-info").textContent = `${state.name} · ${state.width} × ${state.height} px`;
    fitView();
    render();
    $("view").focus();
    if (state.info && state.info.exemplars) {
      setExemplarMode(true);
      say("Draw 1–3 boxes around examples of what to count (drag, or B at two corners), then press Enter.");
    } else {
      count();
    }
  };
  image.onerror = () => say(`This browser cannot show ${state.name}.`, "error");
  image.src = URL.createObjectURL(file);
}

// --- counting ---------------------------------------------------------------------------

function snapshot() {
  return {
    points: state.points.map((p) => ({ ...p })),
    boxes: state.boxes.map((b) => [...b]),
    confidence: state.confidence,
    stoppedBy: state.stoppedBy,
  };
}

function remember() {
  state.undo.push(snapshot());
  state.redo = [];
}

function restore(from, to) {
  if (!from.length) return;
  stopCount();
  to.push(snapshot());
  const s = from.pop();
  Object.assign(state, s);
  state.selected = -1;
  say(`${state.points.length} point(s).`);
  render();
}

async function count() {
  if (!state.file || !state.info) return;
  if (state.info.exemplars && !state.boxes.length) {
    setExemplarMode(true);
    say("This model counts what exemplar boxes show: draw at least one first.", "error");
    return;
  }
  stopCount();
  const given = state.points.map((p) => [p.x, p.y]);
  const limit = state.info.max_objects_limit;
  if (given.length >= limit) {
    say(`${given.length} points: the server takes at most ${limit - 1} to continue from.`, "error");
    return;
  }
  remember();
  const form = new FormData();
  form.append("file", state.file, state.name);
  if (given.length) form.append("points", JSON.stringify(given));
  if (state.boxes.length) form.append("exemplars", JSON.stringify(state.boxes));
  form.append("max_objects", String(Math.min(limit, given.length + state.info.max_objects)));
  const controller = new AbortController();
  state.running = controller;
  state.confidence = null;
  state.stoppedBy = "";
  state.timings.countStarted = performance.now();
  document.body.dataset.state = "counting";
  say(given.length ? `Continuing from ${given.length} point(s)…` : "Counting…");
  refresh();
  try {
    const response = await api("/predict/stream", {
      method: "POST",
      body: form,
      signal: controller.signal,
      headers: { Accept: "application/x-ndjson" },
    });
    await readRecords(response, controller);
  } catch (error) {
    if (controller.signal.aborted) return;
    finish("error", error.message);
  } finally {
    if (state.running === controller) state.running = null;
    refresh();
  }
}

async function readRecords(response, controller) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (controller.signal.aborted) return;
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line) onRecord(JSON.parse(line));
    }
    if (done) break;
  }
  if (state.running === controller && document.body.dataset.state === "counting") {
    finish("error", "the stream ended without its last record");
  }
}

function onRecord(record) {
  if (record.event === "point") {
    state.timings.firstPoint ??= performance.now();
    state.points.push({ x: record.x, y: record.y, by: "model" });
    addMark(state.points.length - 1);
    $("count-value").textContent = String(state.points.length);
  } else if (record.event === "done") {
    state.confidence = record.count_confidence;
    state.stoppedBy = record.stopped_by;
    const why = { done: "the model says done", max_objects: "the object limit was reached" };
    const note = record.count_confidence === null ? " (no confidence for a corrected count)" : "";
    finish("done", `Counted ${record.count} object(s): ${why[record.stopped_by] || record.stopped_by}${note}.`);
  } else if (record.event === "error") {
    finish("error", `Stopped after ${state.points.length} point(s): ${record.status}: ${record.detail}`);
  }
}

function finish(kind, message) {
  state.timings.done = performance.now();
  state.timings.firstDone ??= state.timings.done; // the image's first count, for the tests
  state.running = null;
  document.body.dataset.state = kind;
  say(message, kind);
  render();
}

function stopCount() {
  if (!state.running) return;
  state.running.abort();
  state.running = null;
  document.body.dataset.state = "stopped";
  say(`Stopped at ${state.points.length} point(s).`);
}

// --- corrections ------------------------------------------------------------------------

function toggleAt(x, y, hitRadius) {
  if (!state.file || x < 0 || y < 0 || x > state.width || y > state.height) return;
  const hit = nearest(x, y, hitRadius);
  stopCount();
  remember();
  if (hit >= 0) {
    state.points.splice(hit, 1);
    say(`Removed point ${hit + 1}.`);
  } else {
    state.points.push({ x: round2(x), y: round2(y), by: "person" });
    say(`Added point ${state.points.length}.`);
  }
  corrected();
}

function removeSelected() {
  if (state.selected < 0 || state.selected >= state.points.length) return;
  stopCount();
  remember();
  state.points.splice(state.selected, 1);
  say(`Removed point ${state.selected + 1}.`);
  state.selected = Math.min(state.selected, state.points.length - 1);
  corrected();
}

function corrected() {
  state.confidence = null; // the model's confidence was about its own count
  render();
  if ($("auto").checked && !(state.info && state.info.exemplars && !state.boxes.length)) count();
  else document.body.dataset.state = "corrected";
}

function nearest(x, y, radius) {
  let best = -1;
  let bestD = radius * radius;
  state.points.forEach((p, i) => {
    const d = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (d <= bestD) {
      best = i;
      bestD = d;
    }
  });
  return best;
}

const round2 = (v) => Math.round(v * 100) / 100;

// --- exemplar boxes ---------------------------------------------------------------------

function setExemplarMode(on) {
  state.exemplarMode = on && !!(state.info && state.info.exemplars);
  $("exemplar-mode").setAttribute("aria-pressed", String(state.exemplarMode));
}

function addBox(x1, y1, x2, y2) {
  const box = [
    Math.max(0, Math.min(x1, x2)), Math.max(0, Math.min(y1, y2)),
    Math.min(state.width, Math.max(x1, x2)), Math.min(state.height, Math.max(y1, y2)),
  ].map(round2);
  if (box[2] - box[0] < 2 || box[3] - box[1] < 2) return;
  remember();
  if (state.boxes.length >= state.info.max_exemplars) state.boxes.shift();
  state.boxes.push(box);
  say(`${state.boxes.length} exemplar box(es). Enter counts.`);
  render();
}

// --- the page's text and buttons -------------------------------------------------------

function render() {
  drawAll();
  $("count-value").textContent = state.file ? String(state.points.length) : "–";
  const c = state.confidence;
  $("confidence").textContent = c === null || c === undefined ? "–" : `${Math.round(c * 100)}%`;
  document.body.dataset.count = String(state.points.length);
  refresh();
}

function say(message, kind) {
  $("status").textContent = message;
  if (kind === "error") document.body.dataset.state = "error";
}

function refresh() {
  const has = !!state.file;
  const counting = !!state.running;
  $("count").disabled = !has || counting || !state.info;
  $("count").firstChild.textContent = state.points.length ? "Continue " : "Count ";
  $("stop").disabled = !counting;
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
  for (const id of ["zoom-in", "zoom-out", "fit", "exemplar-mode"]) $(id).disabled = !has;
  for (const id of ["export-csv", "export-json", "save"]) $(id).disabled = !has || counting;
}

// --- export and save --------------------------------------------------------------------

function baseName() {
  return state.name.replace(/\.[^.]*$/, "") || "image";
}

function download(text, type, suffix) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = `${baseName()}.${suffix}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function exportCsv() {
  const quoted = `"${state.name.replaceAll('"', '""')}"`;
  const rows = state.points.map((p) => `${quoted},${p.x},${p.y}`);
  download(["image,x,y", ...rows].join("\n") + "\n", "text/csv", "points.csv");
  say(`Exported ${state.points.length} point(s) as CSV (original pixels).`);
}

function exportJson() {
  const body = {
    image: state.name,
    width: state.width,
    height: state.height,
    count: state.points.length,
    count_confidence: state.confidence,
    points: state.points.map((p) => [p.x, p.y]),
    exemplars: state.boxes,
    model: state.info ? state.info.model : null,
  };
  download(JSON.stringify(body, null, 2) + "\n", "application/json", "points.json");
  say(`Exported ${state.points.length} point(s) as JSON (original pixels).`);
}

async function save() {
  if (!state.file || state.running || !state.info || !state.info.collect) return;
  const form = new FormData();
  form.append("file", state.file, state.name);
  form.append("points", JSON.stringify(state.points.map((p) => [p.x, p.y])));
  $("save").disabled = true;
  try {
    const response = await api("/collect", { method: "POST", body: form });
    const saved = await response.json();
    document.body.dataset.saved = saved.id;
    say(`Saved ${saved.count} point(s) to the dataset as ${saved.path}${saved.replaced ? " (replacing the earlier save)" : ""}.`);
  } catch (error) {
    say(`Not saved: ${error.message}`, "error");
  } finally {
    refresh();
  }
}

// --- input: pointer, wheel, keys, drop, paste -------------------------------------------

let press = null;
const view = $("view");

view.addEventListener("pointerdown", (e) => {
  if (!state.file || e.button !== 0) return;
  view.setPointerCapture(e.pointerId);
  press = { sx: e.clientX, sy: e.clientY, moved: false, start: toImage(e.clientX, e.clientY), vx: state.view.x, vy: state.view.y };
  state.keyboard = false;
  drawCursor();
});

view.addEventListener("pointermove", (e) => {
  if (!press) return;
  const dx = e.clientX - press.sx;
  const dy = e.clientY - press.sy;
  if (!press.moved && Math.hypot(dx, dy) < DRAG_PX) return;
  press.moved = true;
  if (state.exemplarMode) {
    const end = toImage(e.clientX, e.clientY);
    $("boxes").querySelector(".drawing")?.remove();
    $("boxes").append(rect(press.start.x, press.start.y, end.x, end.y, true));
  } else {
    state.view = { ...state.view, x: press.vx + dx, y: press.vy + dy, fit: false };
    applyView();
  }
});

view.addEventListener("pointerup", (e) => {
  if (!press) return;
  const p = press;
  press = null;
  if (p.moved && state.exemplarMode) {
    const end = toImage(e.clientX, e.clientY);
    $("boxes").querySelector(".drawing")?.remove();
    addBox(p.start.x, p.start.y, end.x, end.y);
  } else if (!p.moved) {
    toggleAt(p.start.x, p.start.y, HIT_PX / state.view.scale);
  }
});

view.addEventListener("wheel", (e) => {
  if (!state.file) return;
  e.preventDefault();
  const rect = view.getBoundingClientRect();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - rect.left, e.clientY - rect.top);
}, { passive: false });

function moveCursor(dx, dy, fast) {
  if (!state.cursor) return;
  state.keyboard = true;
  const step = (KEY_STEP_PX * (fast ? 8 : 1)) / state.view.scale;
  state.cursor = {
    x: Math.max(0, Math.min(state.width, state.cursor.x + dx * step)),
    y: Math.max(0, Math.min(state.height, state.cursor.y + dy * step)),
  };
  drawCursor();
  keepCursorInView();
}

function selectPoint(delta) {
  const n = state.points.length;
  if (!n) return;
  state.selected = state.selected < 0 ? (delta > 0 ? 0 : n - 1) : (state.selected + delta + n) % n;
  const p = state.points[state.selected];
  state.cursor = { x: p.x, y: p.y };
  state.keyboard = true;
  say(`Point ${state.selected + 1} of ${n} selected (Delete removes it).`);
  render();
  keepCursorInView();
}

function boxCorner() {
  if (!state.cursor || !state.info || !state.info.exemplars) return;
  setExemplarMode(true);
  if (!state.boxStart) {
    state.boxStart = { ...state.cursor };
    say("First corner set: move to the opposite corner and press B again.");
  } else {
    addBox(state.boxStart.x, state.boxStart.y, state.cursor.x, state.cursor.y);
    state.boxStart = null;
  }
}

const KEYS = {
  o: () => $("file").click(),
  enter: () => count(),
  c: () => count(),
  escape: () => stopCount(),
  "+": () => zoomKey(1.25),
  "=": () => zoomKey(1.25),
  "-": () => zoomKey(0.8),
  0: () => fitView(),
  s: () => save(),
  e: () => setExemplarMode(!state.exemplarMode),
  b: () => boxCorner(),
  " ": () => state.cursor && toggleAt(state.cursor.x, state.cursor.y, HIT_PX / state.view.scale),
  "[": () => selectPoint(-1),
  "]": () => selectPoint(1),
  delete: () => removeSelected(),
  backspace: () => removeSelected(),
};

document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, textarea, form")) return;
  const key = e.key.toLowerCase();
  const ctrl = e.ctrlKey || e.metaKey;
  let action = null;
  if (ctrl && key === "z") action = e.shiftKey ? () => restore(state.redo, state.undo) : () => restore(state.undo, state.redo);
  else if (ctrl && key === "y") action = () => restore(state.redo, state.undo);
  else if (ctrl || e.altKey) return; // leave the browser's own shortcuts alone (Ctrl V pastes)
  else if (e.shiftKey && key === "c") action = exportCsv;
  else if (e.shiftKey && key === "j") action = exportJson;
  else if (key.startsWith("arrow")) {
    const d = { arrowleft: [-1, 0], arrowright: [1, 0], arrowup: [0, -1], arrowdown: [0, 1] }[key];
    action = () => moveCursor(d[0], d[1], e.shiftKey);
  } else if (key === "enter" && e.target.tagName === "BUTTON") return; // the button's own
  else if (key === " " && e.target.tagName === "BUTTON") return;
  else action = KEYS[key] && (() => KEYS[key]());
  if (!action) return;
  e.preventDefault();
  if (!state.file && !["o"].includes(key)) return;
  action();
});

view.addEventListener("dragover", (e) => {
  e.preventDefault();
  view.classList.add("dragging");
});
view.addEventListener("dragleave", () => view.classList.remove("dragging"));
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  view.classList.remove("dragging");
  openFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) {
    e.preventDefault();
    openFile(file);
  }
});

$("file").addEventListener("change", (e) => {
  openFile(e.target.files[0]);
  e.target.value = ""; // the same file again is a new open
});
$("open").addEventListener("click", () => $("file").click());
$("count").addEventListener("click", () => count());
$("stop").addEventListener("click", () => stopCount());
$("undo").addEventListener("click", () => restore(state.undo, state.redo));
$("redo").addEventListener("click", () => restore(state.redo, state.undo));
$("zoom-in").addEventListener("click", () => zoomKey(1.25));
$("zoom-out").addEventListener("click", () => zoomKey(0.8));
$("fit").addEventListener("click", () => fitView());
$("exemplar-mode").addEventListener("click", () => setExemplarMode(!state.exemplarMode));
$("export-csv").addEventListener("click", exportCsv);
$("export-json").addEventListener("click", exportJson);
$("save").addEventListener("click", save);
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("seqops-key", state.key);
  $("key-form").hidden = true;
  loadInfo();
});

watchResize();
loadInfo();
