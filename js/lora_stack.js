// Row widgets for FluxWorksLoraStack, and the report under FluxWorksApplyLoraStack's sockets.
//
// The node's only real input is `rows`, a JSON list of {"lora", "strength", "enabled", "text_strength"}: that
// string is what a workflow saves and what is queued (the API format takes the same JSON), so saved workflows and
// API prompts keep working whatever the UI looks like. The `rows` widget itself is hidden, because a person edits
// the rows through per-row widgets (on/off, file, strength, text-encoder strength, remove) that are never
// serialized. Loading a workflow rebuilds the rows from `rows` without rewriting it. When `rows` is not a JSON list
// of objects (a hand-edited file, a broken API copy) the rows are replaced by one error row that names the problem
// and opens the raw JSON for editing, instead of leaving the previous rows on screen as if they were current.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "FluxWorksLoraStack";
const APPLY_TYPE = "FluxWorksApplyLoraStack";
const REPORT_LINE = 14;
const REPORT_MAX_LINES = 16;
const ROW_KEYS = ["lora", "strength", "enabled", "text_strength"];
const NOTE_LINE = 14; // line height of the wrapped text of the error and hint rows
const ERROR_COLOR = "#ff7070";
const HINT_COLOR = "#e0b050";
const MISSING_COLOR = "#ff9a70";
// Room the combo widget keeps for its arrows on each side (BaseWidget margin + arrowMargin + arrowWidth) plus
// padding: what is left shows the file name.
const COMBO_SIDE = 15 + 6 + 10 + 6;
const MAX_AUTO_WIDTH = 640; // the node grows to show long file names in full, up to this width
const ELLIPSIS = "…";

/** The files in models/loras as the server lists them, then the FluxWorks-only LoRA folder's (`fluxworks_loras`,
 * where the embedded model's LoRA is: core's LoRA loaders do not list it); `names` is null until a listing
 * succeeded. */
class LoraFiles {
  constructor() {
    this.names = null;
    this.error = null; // the last listing's failure, shown on the nodes while no listing ever succeeded
  }

  /** Ask the server again; a failure is shown on the nodes (and logged) and the previous list kept. */
  async refresh() {
    try {
      const response = await api.fetchApi("/models/loras");
      if (!response.ok) throw new Error(`/models/loras answered HTTP ${response.status}`);
      const names = await response.json();
      if (!Array.isArray(names)) throw new Error("/models/loras did not answer with a list of file names");
      const own = await api.fetchApi("/models/fluxworks_loras"); // 404 when the pack registered no such folder
      const extra = own.ok ? await own.json() : [];
      if (!Array.isArray(extra)) throw new Error("/models/fluxworks_loras did not answer with a list of file names");
      this.names = [...names, ...extra.filter((name) => !names.includes(name))];
      this.error = null;
    } catch (error) {
      this.error = String(error?.message ?? error);
      console.warn("FluxWorks LoRA stack: could not list models/loras, keeping the previous list:", error);
    }
  }
}

/** The rows in `text` as {rows} or, when it is not a JSON list of objects, {error} saying what is wrong. */
export function readRows(text) {
  let rows;
  try {
    rows = JSON.parse(text === undefined || text === null || String(text).trim() === "" ? "[]" : text);
  } catch (error) {
    return { error: `rows is not valid JSON (${error.message})` };
  }
  if (!Array.isArray(rows)) return { error: `rows must be a JSON list of rows, got ${typeof rows}` };
  const bad = rows.findIndex((r) => typeof r !== "object" || r === null || Array.isArray(r));
  if (bad >= 0) return { error: `row ${bad} must be an object like {"lora": "file.safetensors", "strength": 1.0}` };
  return { rows };
}

/** The rows in `text`, or null when it is not a JSON list of objects (the server names the problem on queue). */
export function parseRows(text) {
  return readRows(text).rows ?? null;
}

/** Rows as the `rows` widget stores them: keys in a fixed order, so equal rows give equal text. */
export function serializeRows(rows) {
  return JSON.stringify(rows.map((row) => {
    const out = {};
    for (const key of ROW_KEYS) if (row[key] !== undefined) out[key] = row[key];
    for (const key of Object.keys(row)) if (!ROW_KEYS.includes(key)) out[key] = row[key]; // the server names these
    return out;
  }));
}

/**
 * `text` shortened in the middle to fit `width` pixels with `measure(text) -> pixels`: the start and the end
 * (where LoRA names keep their version and extension) both stay readable. Returned unchanged when it fits.
 */
export function middleEllipsis(text, width, measure) {
  if (measure(text) <= width) return text;
  let keep = text.length - 1;
  while (keep > 1) {
    const head = Math.ceil(keep / 2);
    const candidate = text.slice(0, head) + ELLIPSIS + text.slice(text.length - (keep - head));
    if (measure(candidate) <= width) return candidate;
    keep -= 1;
  }
  return ELLIPSIS;
}

/**
 * `text` broken into lines of at most `width` pixels at spaces, so numbers, names and keys are never cut;
 * only a single word wider than the whole line is broken, after its last "_", ".", "/" or "-" that fits (else at
 * the last character that fits).
 */
export function wrapWords(text, width, measure) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (measure(candidate) <= width || !line && measure(word) <= width) {
        line = candidate;
        continue;
      }
      if (line) lines.push(line);
      let rest = word;
      while (measure(rest) > width && rest.length > 1) {
        let n = rest.length - 1;
        while (n > 1 && measure(rest.slice(0, n)) > width) n -= 1;
        const separator = Math.max(...["_", ".", "/", "-"].map((c) => rest.lastIndexOf(c, n - 1)));
        if (separator > 0) n = separator + 1;
        lines.push(rest.slice(0, n));
        rest = rest.slice(n);
      }
      line = rest;
    }
    lines.push(line);
  }
  return lines;
}

function rowsWidget(node) {
  return node.widgets?.find((w) => w.name === "rows");
}

function notSerialized(widget) {
  widget.serialize = false;
  widget.options = { ...(widget.options ?? {}), serialize: false };
  widget.fluxworksRow = true;
  return widget;
}

function writeRows(node, rows) {
  rowsWidget(node).value = serializeRows(rows);
  node.setDirtyCanvas(true, true);
}

/** A full-width row of wrapped text (the error and hint rows); clicking it calls `onClick`. */
function addNoteRow(node, name, text, color, onClick) {
  const widget = notSerialized(node.addWidget("button", name, null, onClick));
  widget.fluxworksNote = text;
  widget.tooltip = text;
  const lines = (ctx, width) => wrapWords(text, width - 30, (t) => ctx.measureText(t).width);
  widget.computeSize = function (width) { // the frontend's layout pass calls this without a width
    const w = width ?? node.size[0];
    return [w, Math.max(1, lines(measuringContext(), w).length) * NOTE_LINE + 8];
  };
  widget.draw = function (ctx, _node, width, y) {
    ctx.save();
    ctx.font = `12px ${LiteGraph.NODE_FONT ?? "Arial"}`;
    const wrapped = lines(ctx, width);
    ctx.strokeStyle = color;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.roundRect(15, y + 1, width - 30, wrapped.length * NOTE_LINE + 6, 4);
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.textAlign = "left";
    wrapped.forEach((line, i) => ctx.fillText(line, 20, y + 14 + i * NOTE_LINE));
    ctx.restore();
    this.fluxworksLines = wrapped;
  };
  return widget;
}

let measuring = null; // one offscreen 2D context to measure text before the node is drawn (a cache, no state)
function measuringContext() {
  measuring ??= document.createElement("canvas").getContext("2d");
  measuring.font = `12px ${LiteGraph.NODE_FONT ?? "Arial"}`;
  return measuring;
}

/**
 * Draws a file combo with the name centred between its arrows, shortened in the middle only when it cannot fit
 * (the stock combo cuts at the end after its label, which left "lor…"); the full name is the widget's tooltip.
 * Uses the 1.32 widget's own shape and arrows, so it looks and clicks like every other combo.
 */
function drawFileCombo(files) {
  return function (ctx, _node, width, _y, _height, lowQuality) {
    this.drawWidgetShape(ctx, { width, showText: !lowQuality });
    const name = String(this.value ?? "");
    const room = width - 2 * COMBO_SIDE;
    const shown = middleEllipsis(name, room, (t) => ctx.measureText(t).width);
    this.fluxworksShown = shown;
    if (lowQuality) return;
    if (!this.computedDisabled) this.drawArrowButtons(ctx, width);
    const missing = files.names !== null && !files.names.includes(name);
    ctx.save();
    ctx.fillStyle = missing ? MISSING_COLOR : this.text_color;
    ctx.textAlign = "center";
    ctx.fillText(shown, width / 2, this.labelBaseline);
    ctx.restore();
  };
}

function fileTooltip(files, name) {
  if (files.names !== null && !files.names.includes(name)) {
    return `${name}: not found in models/loras (queueing will fail); pick another file or put it there and press R`;
  }
  return name;
}

/**
 * Fits the node's height to its widgets and, when a person picked `name`, widens it (up to MAX_AUTO_WIDTH) so
 * that name fits between the combo arrows. Loading a workflow keeps its saved width: the layout is the author's.
 */
function fitSize(node, name = null) {
  let wanted = 0;
  if (name !== null) {
    const longest = measuringContext().measureText(String(name)).width;
    wanted = Math.min(MAX_AUTO_WIDTH, Math.ceil(longest + 2 * COMBO_SIDE + 4));
  }
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w, wanted), h]);
}

function addRow(node, files, rows, i) {
  const row = rows[i];
  const label = `${i + 1}`;
  const current = () => parseRows(rowsWidget(node).value) ?? rows;
  const update = (key) => (value) => {
    const all = current();
    all[i] = { ...all[i], [key]: value };
    writeRows(node, all);
  };
  notSerialized(node.addWidget("toggle", `LoRA ${label}`, row.enabled ?? true, update("enabled"),
    { on: "on", off: "off" }));
  const file = notSerialized(node.addWidget("combo", `lora ${label}`, row.lora ?? "", (value) => {
    update("lora")(value);
    file.tooltip = fileTooltip(files, value);
    fitSize(node, value);
  }, { values: () => {
    const names = files.names ?? [];
    return names.includes(file.value) ? names : [file.value, ...names];
  } }));
  file.tooltip = fileTooltip(files, file.value);
  if (typeof file.drawWidgetShape === "function" && typeof file.drawArrowButtons === "function") {
    file.draw = drawFileCombo(files);
  } else {
    console.warn("FluxWorks LoRA stack: this frontend's combo widget has no drawWidgetShape/drawArrowButtons; "
                 + "file names use its default (end-truncated) drawing");
  }
  const followLabel = `text strength ${label} (= strength)`;
  const textLabel = `text strength ${label}`;
  const text = notSerialized(node.addWidget("number", textLabel, row.text_strength ?? row.strength ?? 1.0,
    (value) => {
      update("text_strength")(value);
      text.label = textLabel;
    }, { min: -10, max: 10, step: 0.5, round: 0.01, precision: 2 }));
  text.label = row.text_strength === undefined ? followLabel : textLabel;
  text.tooltip = "Strength on the text encoders (CLIP-L, T5) for LoRAs that trained them; follows strength "
    + "until you set it. Needs the text encoder connected to FluxWorks Apply LoRA Stack.";
  const strength = notSerialized(node.addWidget("number", `strength ${label}`, row.strength ?? 1.0, (value) => {
    update("strength")(value);
    if (current()[i].text_strength === undefined) text.value = value; // still following strength
  }, { min: -10, max: 10, step: 0.5, round: 0.01, precision: 2 }));
  strength.tooltip = "Strength on the diffusion model (0 = off, negative inverts the LoRA).";
  // the text strength row sits under the model strength row
  node.widgets.splice(node.widgets.indexOf(text), 1);
  node.widgets.splice(node.widgets.indexOf(strength) + 1, 0, text);
  notSerialized(node.addWidget("button", `remove LoRA ${label}`, null, () => {
    const all = current();
    all.splice(i, 1);
    writeRows(node, all);
    rebuildRows(node, files);
  }));
}

/** Replaces the row widgets with widgets for the rows in the `rows` widget (or an error row). */
function rebuildRows(node, files) {
  const widget = rowsWidget(node);
  if (!widget) return;
  widget.hidden = true;
  widget.computeSize = () => [0, -4]; // the layout pass places hidden widgets too: give it no height
  node.widgets = node.widgets.filter((w) => !w.fluxworksRow);
  const { rows, error } = readRows(widget.value);
  if (error) {
    addNoteRow(node, "rows error", `${error}. Click here to edit the rows JSON.`, ERROR_COLOR, (_v, canvas, _n,
      _pos, event) => editRawRows(node, files, canvas ?? app.canvas, event));
    fitSize(node);
    node.setDirtyCanvas(true, true);
    return;
  }
  if (files.names !== null && files.names.length === 0) {
    addNoteRow(node, "no LoRA files", "No LoRA files in models/loras: put .safetensors files there and press R "
      + "to refresh.", HINT_COLOR, () => refreshAll(files));
  } else if (files.names === null && files.error !== null) { // (before the first answer: nothing to say yet)
    addNoteRow(node, "no LoRA list", `Could not list models/loras (${files.error}); press R to try again.`,
      ERROR_COLOR, () => refreshAll(files));
  }
  rows.forEach((_row, i) => addRow(node, files, rows, i));
  const add = notSerialized(node.addWidget("button", "+ add LoRA", null, async () => {
    await files.refresh();
    const all = parseRows(rowsWidget(node).value);
    if (all === null || !files.names?.length) { // the rows broke or the folder emptied meanwhile: show that
      rebuildRows(node, files);
      return;
    }
    all.push({ lora: files.names[0], strength: 1.0, enabled: true });
    writeRows(node, all);
    rebuildRows(node, files);
    fitSize(node, files.names[0]);
  }));
  add.disabled = !files.names?.length;
  fitSize(node);
  node.setDirtyCanvas(true, true);
}

/** The raw rows JSON in the canvas's own text prompt; OK writes it back and rebuilds the rows from it. */
function editRawRows(node, files, canvas, event) {
  canvas.prompt("rows (JSON)", rowsWidget(node).value, (value) => {
    rowsWidget(node).value = value;
    rebuildRows(node, files);
  }, event, true);
}

async function refreshAll(files) {
  await files.refresh();
  for (const node of app.graph?.nodes ?? []) if (node.type === NODE_TYPE) rebuildRows(node, files);
}

/** FluxWorksApplyLoraStack shows what it applied and the keys it could not, under its sockets. */
function addReport(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const result = onExecuted?.apply(this, arguments);
    this.fluxworksReport = (message?.text ?? []).join("\n");
    this.setDirtyCanvas(true, true);
    return result;
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const result = onDrawForeground?.apply(this, arguments);
    if (!this.fluxworksReport || this.flags?.collapsed) return result;
    ctx.save();
    ctx.font = "11px monospace";
    ctx.fillStyle = "#bbb";
    const slots = Math.max(this.inputs?.filter((i) => !i.widget).length ?? 0, this.outputs?.length ?? 0) * 20 + 16;
    // below the widgets too (switch_vram), where the frontend records their position
    const widgets = (this.widgets ?? []).reduce((y, w) => Math.max(y, (w.last_y ?? w.y ?? -1000) + 36), 0);
    const top = Math.max(slots, widgets);
    let lines = wrapWords(this.fluxworksReport, this.size[0] - 20, (t) => ctx.measureText(t).width);
    if (lines.length > REPORT_MAX_LINES) {
      lines = lines.slice(0, REPORT_MAX_LINES);
      lines.push("… (full list in the console log)");
    }
    this.fluxworksReportLines = lines;
    lines.forEach((line, i) => ctx.fillText(line, 10, top + i * REPORT_LINE));
    ctx.restore();
    const needed = top + lines.length * REPORT_LINE;
    if (this.size[1] < needed) {
      this.setSize([this.size[0], needed]);
      this.setDirtyCanvas(true, true); // the background of this frame is already drawn at the old size
    }
    return result;
  };
}

const files = new LoraFiles();

app.registerExtension({
  name: "FluxWorks.LoraStack",
  async setup() {
    await refreshAll(files);
  },
  // R (Refresh Node Definitions) re-reads every model folder: list models/loras again and redraw the rows.
  async refreshComboInNodes() {
    await refreshAll(files);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === APPLY_TYPE) addReport(nodeType);
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      const widget = rowsWidget(node);
      const edited = widget.callback;
      widget.callback = function () { // the JSON set by another extension or by hand: show its rows
        const out = edited?.apply(this, arguments);
        rebuildRows(node, files);
        return out;
      };
      rebuildRows(node, files);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      rebuildRows(this, files);
      return result;
    };
  },
});
