// Row widgets for FluxWorksLoraStack: per LoRA an on/off toggle, the file and the strength, plus "add" and
// "remove" buttons. They edit the node's `rows` widget, a JSON list of {"lora", "strength", "enabled"}: that string
// is what the workflow saves and what is queued (the API format takes the same JSON), so the row widgets are never
// serialized themselves. Loading a workflow rebuilds the rows from `rows` without rewriting it.
// FluxWorksApplyLoraStack draws its report (applied LoRAs, keys not applied) under its sockets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "FluxWorksLoraStack";
const APPLY_TYPE = "FluxWorksApplyLoraStack";
const REPORT_LINE = 14;
const REPORT_MAX_LINES = 16;
const ROW_KEYS = ["lora", "strength", "enabled", "text_strength"];
let loraNames = [];

/** Refresh the LoRA file list; a failure is reported and the previous list kept. */
async function listLoras() {
  try {
    const response = await api.fetchApi("/models/loras");
    if (!response.ok) throw new Error(`/models/loras answered HTTP ${response.status}`);
    loraNames = await response.json();
  } catch (error) {
    console.warn("FluxWorks LoRA stack: could not list models/loras, keeping the previous list:", error);
  }
}

/** The rows in `text`, or null when it is not a JSON list of objects (the server names the problem on queue). */
export function parseRows(text) {
  let rows;
  try {
    rows = JSON.parse(text || "[]");
  } catch {
    return null;
  }
  if (!Array.isArray(rows) || rows.some((r) => typeof r !== "object" || r === null)) return null;
  return rows;
}

/** Rows as the `rows` widget stores them: keys in a fixed order, so equal rows give equal text. */
export function serializeRows(rows) {
  return JSON.stringify(rows.map((row) => {
    const out = {};
    for (const key of ROW_KEYS) if (row[key] !== undefined) out[key] = row[key];
    return out;
  }));
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
  const widget = rowsWidget(node);
  widget.value = serializeRows(rows);
  node.setDirtyCanvas(true, true);
}

function rebuildRows(node) {
  const widget = rowsWidget(node);
  if (!widget) return;
  const rows = parseRows(widget.value);
  if (rows === null) return; // leave a hand-edited, invalid value alone: queueing reports the problem
  node.widgets = node.widgets.filter((w) => !w.fluxworksRow);
  rows.forEach((row, i) => {
    const label = `${i + 1}`;
    const update = (key) => (value) => {
      const current = parseRows(rowsWidget(node).value) ?? rows;
      current[i] = { ...current[i], [key]: value };
      writeRows(node, current);
    };
    notSerialized(node.addWidget("toggle", `lora ${label} on`, row.enabled ?? true, update("enabled"),
      { on: "on", off: "off" }));
    notSerialized(node.addWidget("combo", `lora ${label}`, row.lora ?? "", update("lora"),
      { values: () => (loraNames.includes(row.lora) ? loraNames : [row.lora, ...loraNames]) }));
    notSerialized(node.addWidget("number", `strength ${label}`, row.strength ?? 1.0, update("strength"),
      { min: -10, max: 10, step: 0.5, round: 0.01, precision: 2 }));
    notSerialized(node.addWidget("button", `remove LoRA ${label}`, null, () => {
      const current = parseRows(rowsWidget(node).value) ?? rows;
      current.splice(i, 1);
      writeRows(node, current);
      rebuildRows(node);
    }));
  });
  notSerialized(node.addWidget("button", "+ add LoRA", null, async () => {
    await listLoras();
    const current = parseRows(rowsWidget(node).value) ?? [];
    current.push({ lora: loraNames[0] ?? "", strength: 1.0, enabled: true });
    writeRows(node, current);
    rebuildRows(node);
  }));
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas(true, true);
}

/** The report lines wrapped to `width` pixels, at most REPORT_MAX_LINES of them. */
function wrapReport(ctx, lines, width) {
  const out = [];
  for (const line of lines) {
    let rest = line;
    while (rest.length && out.length < REPORT_MAX_LINES) {
      let n = rest.length;
      while (n > 1 && ctx.measureText(rest.slice(0, n)).width > width) n = Math.floor(n * 0.9);
      out.push(rest.slice(0, n));
      rest = rest.slice(n);
    }
  }
  if (out.length === REPORT_MAX_LINES) out[REPORT_MAX_LINES - 1] += " … (full list in the console log)";
  return out;
}

/** FluxWorksApplyLoraStack shows what it applied and the keys it could not, under its sockets. */
function addReport(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const result = onExecuted?.apply(this, arguments);
    this.fluxworksReport = (message?.text ?? []).join("\n").split("\n");
    this.setDirtyCanvas(true, true);
    return result;
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const result = onDrawForeground?.apply(this, arguments);
    if (!this.fluxworksReport?.length || this.flags?.collapsed) return result;
    ctx.save();
    ctx.font = "11px monospace";
    ctx.fillStyle = "#bbb";
    const slots = Math.max(this.inputs?.length ?? 0, this.outputs?.length ?? 0) * 20 + 16;
    // below the widgets too (switch_vram), where the frontend records their position
    const widgets = (this.widgets ?? []).reduce((y, w) => Math.max(y, (w.last_y ?? w.y ?? -1000) + 36), 0);
    const top = Math.max(slots, widgets);
    const lines = wrapReport(ctx, this.fluxworksReport, this.size[0] - 20);
    lines.forEach((line, i) => ctx.fillText(line, 10, top + i * REPORT_LINE));
    ctx.restore();
    const needed = top + lines.length * REPORT_LINE;
    if (this.size[1] < needed) this.setSize([this.size[0], needed]);
    return result;
  };
}

app.registerExtension({
  name: "FluxWorks.LoraStack",
  async setup() {
    await listLoras();
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
      widget.callback = function () { // the JSON edited by hand: show its rows
        const out = edited?.apply(this, arguments);
        rebuildRows(node);
        return out;
      };
      rebuildRows(node);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      rebuildRows(this);
      return result;
    };
  },
});
