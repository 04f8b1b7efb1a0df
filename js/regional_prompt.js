// Rectangles on the FluxWorksRegionalPrompt node: draw, move and resize the regions in a frame under the widgets,
// over the picture of the optional `image` input (the picture a LoadImage node shows).
//
// The node's real input is `regions`, a JSON list of {"prompt", "x", "y", "w", "h", "strength", "on"} with the
// rectangle in fractions of the image (nodes/regional.py parse_rows reads it). That string is what a workflow saves
// and what is queued, so API prompts and saved workflows work without this file; the widget only edits it. The raw
// JSON widget is hidden: a person edits the rows through per-row widgets (on/off, prompt, strength, remove), which
// are never serialized, and through the rectangles. Loading a workflow rebuilds the rows from `regions` without
// rewriting it; text that is not a JSON list of objects is shown as an error row (click it to edit the JSON) instead
// of stale rectangles.
//
// Mouse, inside the frame: drag on empty space draws a new region (a row with an empty prompt, to be typed); drag
// inside a rectangle moves it; drag one of its corners resizes it. Rows whose mask_i input is connected are drawn
// dashed and labelled mask_i: the mask replaces the rectangle (and is not drawn here). The last row is on top.
// What was drawn is kept on `node.fluxworksRegions` so tests can compare it with the JSON.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "FluxWorksRegionalPrompt";
const ROW_KEYS = ["prompt", "x", "y", "w", "h", "strength", "on"];
const MAX_ROWS = 8; // nodes/regional.py MAX_ROWS
const SLOTS = 4; // nodes/regional.py SLOTS: conditioning_i / mask_i for rows 1..4
const FRAME_HEIGHT = 240; // room under the widgets for the frame
const MIN_WIDTH = 320;
const MARGIN = 10;
const HANDLE = 7; // a corner grab zone, in canvas units
const MIN_SIDE = 0.02; // smallest rectangle side, as a fraction of the image
const DECIMALS = 4;
const COLORS = ["#ff6b6b", "#4dabf7", "#69db7c", "#ffd43b", "#da77f2", "#ff922b", "#3bc9db", "#f783ac"];
const FRAME_COLOR = "#888";
const GUIDE_COLOR = "rgba(255, 255, 255, 0.12)";
const HINT_COLOR = "#aaa";
const ERROR_COLOR = "#ff7070";
const NOTE_LINE = 14;

/** The rows in `text` as {rows} or, when it is not a JSON list of objects, {error} saying what is wrong. */
export function readRegions(text) {
  let rows;
  try {
    rows = JSON.parse(text === undefined || text === null || String(text).trim() === "" ? "[]" : text);
  } catch (error) {
    return { error: `regions is not valid JSON (${error.message})` };
  }
  if (!Array.isArray(rows)) return { error: `regions must be a JSON list of rows, got ${typeof rows}` };
  const bad = rows.findIndex((r) => typeof r !== "object" || r === null || Array.isArray(r));
  if (bad >= 0) return { error: `regions row ${bad + 1} must be an object like {"prompt": "...", "x": 0, "y": 0, "w": 0.5, "h": 1}` };
  return { rows };
}

/** Rows as the `regions` widget stores them: keys in a fixed order (unknown keys kept, the server names them). */
export function serializeRegions(rows) {
  return JSON.stringify(rows.map((row) => {
    const out = {};
    for (const key of ROW_KEYS) if (row[key] !== undefined) out[key] = row[key];
    for (const key of Object.keys(row)) if (!ROW_KEYS.includes(key)) out[key] = row[key];
    return out;
  }));
}

/** The rectangle of a row as parse_rows reads it (missing keys: the whole image). */
export function rowBox(row) {
  const num = (v, d) => (typeof v === "number" && Number.isFinite(v) ? v : d);
  return { x: num(row.x, 0), y: num(row.y, 0), w: num(row.w, 1), h: num(row.h, 1) };
}

function round(v) {
  return Number(v.toFixed(DECIMALS));
}

/** A box with both corners clamped into the image and sides of at least MIN_SIDE, rounded for the JSON. */
export function clampBox(x0, y0, x1, y1) {
  let left = Math.max(0, Math.min(x0, x1));
  let top = Math.max(0, Math.min(y0, y1));
  let right = Math.min(1, Math.max(x0, x1));
  let bottom = Math.min(1, Math.max(y0, y1));
  if (right - left < MIN_SIDE) [left, right] = left + MIN_SIDE <= 1 ? [left, left + MIN_SIDE] : [1 - MIN_SIDE, 1];
  if (bottom - top < MIN_SIDE) [top, bottom] = top + MIN_SIDE <= 1 ? [top, top + MIN_SIDE] : [1 - MIN_SIDE, 1];
  const x = round(left);
  const y = round(top);
  return { x, y, w: round(Math.min(right, 1) - x), h: round(Math.min(bottom, 1) - y) };
}

function regionsWidget(node) {
  return node.widgets?.find((w) => w.name === "regions");
}

function currentRows(node) {
  return readRegions(regionsWidget(node)?.value).rows ?? null;
}

function writeRows(node, rows) {
  regionsWidget(node).value = serializeRegions(rows);
  node.setDirtyCanvas(true, true);
}

function inputLinked(node, name) {
  return node.inputs?.find((i) => i.name === name)?.link != null;
}

function notSerialized(widget) {
  widget.serialize = false;
  widget.options = { ...(widget.options ?? {}), serialize: false };
  widget.fluxworksRow = true;
  return widget;
}

/** The picture of the `image` input: what its source node shows (LoadImage's `imgs`), or null. */
function previewImage(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "image");
  if (slot === undefined || slot < 0 || node.inputs[slot].link == null) return null;
  const source = node.getInputNode?.(slot);
  const img = source?.imgs?.[0];
  return img && img.naturalWidth > 0 ? img : null;
}

/** Bottom edge (node-local y) of the last visible widget, or null before the canvas has laid them out. */
function widgetsBottom(node) {
  let bottom = null;
  for (const w of node.widgets ?? []) {
    if (w.hidden) continue;
    if (typeof w.y !== "number" || typeof w.computedHeight !== "number") return null;
    bottom = Math.max(bottom ?? 0, w.y + w.computedHeight);
  }
  return bottom;
}

/** The frame (node-local) the image is shown in: the largest of the image's aspect (square without one). */
function frameRect(node, image) {
  const top = (widgetsBottom(node) ?? 0) + 8;
  const roomW = node.size[0] - 2 * MARGIN;
  const roomH = node.size[1] - top - MARGIN - 6; // clear of the node's resize corner
  if (roomW < 20 || roomH < 20) return null;
  const aspect = image ? image.naturalWidth / image.naturalHeight : 1;
  const w = Math.min(roomW, roomH * aspect);
  const h = w / aspect;
  return { x: MARGIN + (roomW - w) / 2, y: top, w, h };
}

function toImage(frame, pos) {
  return [(pos[0] - frame.x) / frame.w, (pos[1] - frame.y) / frame.h];
}

/** Which row (topmost first) and what part of it is under `pos`: a corner ("nw", "ne", "sw", "se") or "move". */
function hitTest(node, frame, rows, pos) {
  for (let i = rows.length - 1; i >= 0; i -= 1) {
    if (i < SLOTS && inputLinked(node, `mask_${i + 1}`)) continue; // its mask decides, the box is not used
    const b = rowBox(rows[i]);
    const left = frame.x + b.x * frame.w;
    const top = frame.y + b.y * frame.h;
    const right = left + b.w * frame.w;
    const bottom = top + b.h * frame.h;
    const corners = { nw: [left, top], ne: [right, top], sw: [left, bottom], se: [right, bottom] };
    for (const [name, [cx, cy]] of Object.entries(corners)) {
      if (Math.abs(pos[0] - cx) <= HANDLE && Math.abs(pos[1] - cy) <= HANDLE) return { row: i, part: name };
    }
    if (pos[0] >= left && pos[0] <= right && pos[1] >= top && pos[1] <= bottom) return { row: i, part: "move" };
  }
  return null;
}

/** The box a drag gives: `drag` holds where it started (image fractions) and the row's box then. */
function draggedBox(drag, at) {
  const [fx, fy] = at;
  if (drag.part === "draw") return clampBox(drag.start[0], drag.start[1], fx, fy);
  const b = drag.box;
  if (drag.part === "move") {
    const x = Math.max(0, Math.min(1 - b.w, b.x + fx - drag.start[0]));
    const y = Math.max(0, Math.min(1 - b.h, b.y + fy - drag.start[1]));
    return { x: round(x), y: round(y), w: b.w, h: b.h };
  }
  const ax = drag.part.includes("w") ? b.x + b.w : b.x; // the opposite corner stays put
  const ay = drag.part.includes("n") ? b.y + b.h : b.y;
  return clampBox(ax, ay, fx, fy);
}

function rowLabel(node, rows, i) {
  const masked = i < SLOTS && inputLinked(node, `mask_${i + 1}`);
  const conditioned = i < SLOTS && inputLinked(node, `conditioning_${i + 1}`);
  const text = conditioned ? `conditioning_${i + 1}` : String(rows[i].prompt ?? "").trim() || "(no prompt yet)";
  return `${i + 1}: ${text}${masked ? ` [mask_${i + 1}]` : ""}`;
}

/** `text` cut at the end (with "…") to fit `width` pixels; canvas maxWidth would squeeze the letters instead. */
function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let n = text.length;
  while (n > 1 && ctx.measureText(`${text.slice(0, n)}…`).width > width) n -= 1;
  return `${text.slice(0, n)}…`;
}

function drawFrame(node, ctx) {
  const image = previewImage(node);
  if (widgetsBottom(node) === null) {
    node.setDirtyCanvas(true, false); // widgets get their positions in this frame: draw in the next
    return;
  }
  const frame = frameRect(node, image);
  const rows = currentRows(node);
  const drag = node.fluxworksDrag;
  const state = { frame, image: Boolean(image), rows: [], error: rows === null };
  node.fluxworksRegions = state;
  if (!frame) return;
  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
  ctx.fillRect(frame.x, frame.y, frame.w, frame.h);
  if (image) ctx.drawImage(image, frame.x, frame.y, frame.w, frame.h);
  ctx.strokeStyle = GUIDE_COLOR; // thirds: the embedded model's grid cells, and a common composition guide
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (const t of [1 / 3, 2 / 3]) {
    ctx.moveTo(frame.x + t * frame.w, frame.y);
    ctx.lineTo(frame.x + t * frame.w, frame.y + frame.h);
    ctx.moveTo(frame.x, frame.y + t * frame.h);
    ctx.lineTo(frame.x + frame.w, frame.y + t * frame.h);
  }
  ctx.stroke();
  ctx.strokeStyle = FRAME_COLOR;
  ctx.strokeRect(frame.x, frame.y, frame.w, frame.h);
  ctx.font = "11px Arial";
  ctx.textAlign = "left";
  if (rows === null) {
    ctx.restore();
    return;
  }
  rows.forEach((row, i) => {
    const box = drag && drag.row === i ? drag.current : rowBox(row);
    const masked = i < SLOTS && inputLinked(node, `mask_${i + 1}`);
    const on = row.on !== false;
    const color = COLORS[i % COLORS.length];
    const x = frame.x + box.x * frame.w;
    const y = frame.y + box.y * frame.h;
    const w = box.w * frame.w;
    const h = box.h * frame.h;
    state.rows.push({ row: i, box, on, masked, color, canvas: { x, y, w, h } });
    ctx.globalAlpha = on ? 1 : 0.45;
    ctx.fillStyle = color + "38"; // about 22 % opaque
    if (!masked) ctx.fillRect(x, y, w, h);
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.setLineDash(masked || !on ? [5, 4] : []);
    ctx.strokeRect(x, y, w, h);
    ctx.setLineDash([]);
    if (!masked) {
      ctx.fillStyle = color;
      for (const [cx, cy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) ctx.fillRect(cx - 3, cy - 3, 6, 6);
    }
    ctx.fillStyle = "#fff";
    ctx.fillText(fitText(ctx, rowLabel(node, rows, i), w - 8), x + 4, y + 13);
  });
  ctx.globalAlpha = 1;
  if (drag?.part === "draw") {
    const b = drag.current;
    ctx.strokeStyle = COLORS[rows.length % COLORS.length];
    ctx.setLineDash([4, 3]);
    ctx.strokeRect(frame.x + b.x * frame.w, frame.y + b.y * frame.h, b.w * frame.w, b.h * frame.h);
    ctx.setLineDash([]);
  }
  if (!rows.length) {
    ctx.fillStyle = HINT_COLOR;
    ctx.textAlign = "center";
    ctx.fillText("drag here to draw a region", frame.x + frame.w / 2, frame.y + frame.h / 2, frame.w - 10);
  } else if (rows.length >= MAX_ROWS) {
    ctx.fillStyle = HINT_COLOR;
    ctx.textAlign = "center";
    ctx.fillText(`${MAX_ROWS} regions: the most a node takes`, frame.x + frame.w / 2, frame.y + frame.h - 6);
  }
  ctx.restore();
}

function localPos(node, event) {
  return [event.canvasX - node.pos[0], event.canvasY - node.pos[1]];
}

/** A press in the frame starts drawing, moving or resizing: the canvas's pointer then reports the drag
 * (onDrag on every move, onDragEnd on release), as it does for the frontend's own node dragging. */
function onMouseDown(node, event, pos, canvas) {
  node.fluxworksPresses = (node.fluxworksPresses ?? 0) + 1;
  const state = node.fluxworksRegions;
  const rows = currentRows(node);
  const frame = state?.frame;
  if (!frame || rows === null || event.button !== 0 || !canvas?.pointer) return false;
  const hit = hitTest(node, frame, rows, pos);
  const inFrame = pos[0] >= frame.x && pos[0] <= frame.x + frame.w && pos[1] >= frame.y && pos[1] <= frame.y + frame.h;
  if (!inFrame && (!hit || hit.part === "move")) return false; // a corner handle may stick out of the frame
  const start = toImage(frame, pos);
  if (hit) {
    const box = rowBox(rows[hit.row]);
    node.fluxworksDrag = { row: hit.row, part: hit.part, start, box, current: box, moved: false };
  } else if (rows.length < MAX_ROWS) {
    node.fluxworksDrag = { row: null, part: "draw", start, moved: false,
      current: clampBox(start[0], start[1], start[0], start[1]) };
  } else {
    return false;
  }
  const pointer = canvas.pointer;
  pointer.onDrag = (e) => {
    const drag = node.fluxworksDrag;
    if (!drag) return;
    drag.current = draggedBox(drag, toImage(frame, localPos(node, e)));
    drag.moved = true;
    node.setDirtyCanvas(true, false);
  };
  pointer.onDragEnd = (e) => {
    pointer.onDrag(e);
    finishDrag(node);
  };
  pointer.finally = () => { // released without a drag (a click), or the pointer was reset: nothing changes
    if (node.fluxworksDrag) finishDrag(node);
  };
  node.setDirtyCanvas(true, false);
  return true;
}

function finishDrag(node) {
  const drag = node.fluxworksDrag;
  node.fluxworksDrag = null;
  node.setDirtyCanvas(true, false);
  if (!drag?.moved) return;
  const rows = currentRows(node);
  if (rows === null) return;
  if (drag.part === "draw") {
    rows.push({ prompt: "", ...drag.current, strength: 1.0, on: true });
    writeRows(node, rows);
    rebuildRows(node);
  } else {
    rows[drag.row] = { ...rows[drag.row], ...drag.current };
    writeRows(node, rows);
  }
}

/** A full-width row of wrapped text (the error row); clicking it calls `onClick`. */
function addNoteRow(node, name, text, color, onClick) {
  const widget = notSerialized(node.addWidget("button", name, null, onClick));
  widget.fluxworksNote = text;
  widget.tooltip = text;
  const wrap = (ctx, width) => {
    const lines = [];
    let line = "";
    for (const word of text.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(candidate).width > width - 30) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    lines.push(line);
    return lines;
  };
  widget.computeSize = function (width) {
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = "12px Arial";
    return [width ?? node.size[0], wrap(ctx, width ?? node.size[0]).length * NOTE_LINE + 8];
  };
  widget.draw = function (ctx, _node, width, y) {
    ctx.save();
    ctx.font = "12px Arial";
    const lines = wrap(ctx, width);
    ctx.strokeStyle = color;
    ctx.beginPath();
    ctx.roundRect(15, y + 1, width - 30, lines.length * NOTE_LINE + 6, 4);
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.textAlign = "left";
    lines.forEach((l, i) => ctx.fillText(l, 20, y + 14 + i * NOTE_LINE));
    ctx.restore();
  };
  return widget;
}

function addRow(node, rows, i) {
  const label = `${i + 1}`;
  const update = (key) => (value) => {
    const all = currentRows(node) ?? rows;
    all[i] = { ...all[i], [key]: value };
    writeRows(node, all);
  };
  const row = rows[i];
  const toggle = notSerialized(node.addWidget("toggle", `region ${label}`, row.on !== false, update("on"),
    { on: "on", off: "off" }));
  toggle.tooltip = "Switch this region off without deleting it.";
  const prompt = notSerialized(node.addWidget("text", `prompt ${label}`, String(row.prompt ?? ""),
    update("prompt")));
  const fromConditioning = i < SLOTS && inputLinked(node, `conditioning_${i + 1}`);
  prompt.disabled = fromConditioning;
  prompt.label = fromConditioning ? `prompt ${label}: from conditioning_${label}` : `prompt ${label}`;
  prompt.tooltip = fromConditioning ? `conditioning_${label} is connected: it is this region's prompt.`
    : "What this region shows (with the embedded model: one object phrase of its grammar).";
  const strength = notSerialized(node.addWidget("number", `strength ${label}`, row.strength ?? 1.0,
    update("strength"), { min: 0, max: 10, step: 0.5, round: 0.05, precision: 2 }));
  strength.tooltip = "Weight of this region's prompt inside it (1 = plain; 0 leaves the region out).";
  notSerialized(node.addWidget("button", `remove region ${label}`, null, () => {
    const all = currentRows(node) ?? rows;
    all.splice(i, 1);
    writeRows(node, all);
    rebuildRows(node);
  }));
}

/** Replaces the row widgets with widgets for the rows in `regions` (or one error row). */
function rebuildRows(node, keepHeight = false) {
  const widget = regionsWidget(node);
  if (!widget) return;
  widget.hidden = true;
  widget.computeSize = () => [0, -4]; // the layout pass places hidden widgets too: give it no height
  node.widgets = node.widgets.filter((w) => !w.fluxworksRow);
  const { rows, error } = readRegions(widget.value);
  if (error) {
    addNoteRow(node, "regions error", `${error}. Click here to edit the regions JSON.`, ERROR_COLOR,
      (_v, canvas, _n, _pos, event) => (canvas ?? app.canvas).prompt("regions (JSON)", widget.value, (value) => {
        widget.value = value;
        rebuildRows(node);
      }, event, true));
  } else {
    rows.forEach((_row, i) => addRow(node, rows, i));
  }
  // the height the widgets need (a row added or removed), or at least the present one (a link changed)
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), keepHeight ? Math.max(h, node.size[1]) : h]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "FluxWorks.RegionalPrompt",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize.apply(this, arguments);
      return [Math.max(size[0], MIN_WIDTH), size[1] + FRAME_HEIGHT];
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      const widget = regionsWidget(node);
      const edited = widget?.callback;
      if (widget) {
        widget.callback = function () { // the JSON set by another extension or by hand: show its rows
          const out = edited?.apply(this, arguments);
          rebuildRows(node);
          return out;
        };
      }
      rebuildRows(node);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      rebuildRows(this, true); // a saved size stays (the author's layout) when the rows fit in it
      return result;
    };

    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      if (this.widgets) rebuildRows(this, true); // conditioning_i greys prompt i; mask_i dashes rectangle i
      return result;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawFrame(this, ctx);
      return result;
    };

    const onMouseDownPrevious = nodeType.prototype.onMouseDown;
    nodeType.prototype.onMouseDown = function (event, pos, canvas) {
      return onMouseDown(this, event, pos, canvas) || onMouseDownPrevious?.apply(this, arguments);
    };
  },
});
