// Draws the guidance curve of a FluxWorksGuidanceSchedule node under its widgets and redraws it as they change,
// with axes (progress or the connected sampler's steps, guidance value) and a mark per sampling step.
// It also makes the FluxWorks Sampler show what a schedule overrides: its own `guidance` widget is greyed out, with
// a note, while a `guidance_schedule` is linked (the sampler then ignores that value).
//
// True CFG needs the sampler's `negative` input: like diffusers' FluxPipeline, the sampler turns true CFG off (and
// logs a warning) when no negative is connected. So the curve labels its CFG window "CFG off: ..." (hatched) when
// every FluxWorks Sampler it feeds lacks a negative, or when it only feeds FluxWorks Schedule Core Model (core
// samplers use their own cfg, the schedule's cfg_scale is not read there); with nothing connected it shows the
// window as set.
//
// The curve mirrors flux_sampler/guidance.py (GuidanceCurve.value_at, cfg_active and __post_init__'s checks) and
// the step marks flux_sampler/progress.py (step i of n at i / (n - 1)): keep them in step. What was drawn is kept
// on `node.fluxworksCurve` so tests can compare it with Python.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "FluxWorksGuidanceSchedule";
const SAMPLER_TYPE = "FluxWorksSampler";
const CORE_TYPE = "FluxWorksScheduleCoreModel";
const REROUTE_TYPE = "Reroute"; // the frontend's reroute node: look through it to the real consumer
const SHAPES = ["constant", "linear", "cosine", "exponential", "step"];
const SAMPLES = 101; // progress 0, 0.01, ..., 1: the percent widgets' own resolution
const PLOT_HEIGHT = 150;
const MARGIN = 10;
const GUTTER = 34; // room for the y-axis labels left of the plot
const AXIS_ROOM = 24; // room for the x-axis tick labels and title under the plot
const CURVE_COLOR = "#7fd0ff";
const CFG_COLOR = "rgba(240, 150, 40, 0.30)";
const CFG_OFF_HATCH = "rgba(20, 20, 20, 0.55)";
const AXIS_COLOR = "#888";
const STEP_COLOR = "#d8eefa";
const STEP_RING = 3.5; // radius of a step mark
const LABEL_COLOR = "#aaa";
const WARN_COLOR = "#f0b060";
const ERROR_COLOR = "#ff7070";
const MAX_STEP_MARKS_PER_PIXEL = 1 / 8; // one step mark per 8 px at most; beyond that every k-th step
const PERCENT_TICKS = [0, 0.25, 0.5, 0.75, 1];
const GUIDANCE_NOTE = "Set by the connected guidance_schedule: this value is not used. Edit the curve on the "
  + "FluxWorks Guidance Schedule node, or disconnect it to use this value.";

/** First problem in the settings, worded like GuidanceCurve.__post_init__, or null. */
function settingsError(s) {
  if (!SHAPES.includes(s.shape)) return `shape must be one of ${SHAPES.join(", ")}`;
  for (const name of ["start_percent", "end_percent", "cfg_start_percent", "cfg_end_percent"]) {
    if (!(s[name] >= 0 && s[name] <= 1)) return `${name} must be within [0, 1]`;
  }
  if (s.start_percent > s.end_percent) return "start_percent must not exceed end_percent";
  if (s.cfg_start_percent > s.cfg_end_percent) return "cfg_start_percent must not exceed cfg_end_percent";
  if (s.shape === "exponential" && (s.start_value <= 0 || s.end_value <= 0)) {
    return "exponential needs positive start and end values";
  }
  if (s.cfg_scale < 0) return "cfg_scale must be non-negative";
  return null;
}

/** GuidanceCurve.value_at(progress) from flux_sampler/guidance.py. */
function valueAt(s, progress) {
  if (s.shape === "constant") return s.start_value;
  if (progress <= s.start_percent) return s.start_value;
  if (progress >= s.end_percent) return s.end_value;
  const u = (progress - s.start_percent) / (s.end_percent - s.start_percent);
  const a = s.start_value;
  const b = s.end_value;
  if (s.shape === "linear") return a + (b - a) * u;
  if (s.shape === "cosine") return a + (b - a) * (1.0 - Math.cos(Math.PI * u)) / 2.0;
  if (s.shape === "exponential") return a * Math.pow(b / a, u);
  return u < 0.5 ? a : b; // step
}

/** The curve sampled at SAMPLES points, as GuidanceCurve.values(SAMPLES) computes it, plus the CFG window. */
export function sampleCurve(settings) {
  const error = settingsError(settings);
  if (error) return { error, settings };
  const progress = Array.from({ length: SAMPLES }, (_, i) => i / (SAMPLES - 1));
  const values = progress.map((p) => valueAt(settings, p));
  // GuidanceCurve.cfg_active: the negative prompt is evaluated only when cfg_scale != 1, inside the window.
  const cfgWindow = settings.cfg_scale !== 1.0 ? [settings.cfg_start_percent, settings.cfg_end_percent] : null;
  return { settings, progress, values, cfgWindow };
}

/** StepPosition.progress of every step of an n-step run: i / (n - 1), 0 for one step. */
export function stepProgress(steps) {
  return Array.from({ length: steps }, (_, i) => (steps <= 1 ? 0 : i / (steps - 1)));
}

/** The nodes that take `node`'s output `slot`, looking through reroute nodes. */
function consumers(node, slot = 0, seen = new Set()) {
  const out = [];
  for (const target of node.getOutputNodes?.(slot) ?? []) {
    if (seen.has(target.id)) continue;
    seen.add(target.id);
    if (target.type === REROUTE_TYPE) out.push(...consumers(target, 0, seen));
    else out.push(target);
  }
  return out;
}

function inputLinked(node, name) {
  return node.inputs?.find((i) => i.name === name)?.link != null;
}

/**
 * What the schedule's consumers make of it: the sampler step counts (to mark the steps) and whether its true CFG
 * can run. `cfg` is "on" (a FluxWorks Sampler with a negative takes it), "off" with the reason, or "unknown"
 * (nothing connected yet).
 */
export function scheduleUse(node) {
  const targets = consumers(node);
  const samplers = targets.filter((n) => n.type === SAMPLER_TYPE);
  const cores = targets.filter((n) => n.type === CORE_TYPE);
  const counts = [...new Set(samplers.map((n) => n.widgets?.find((w) => w.name === "steps")?.value)
    .filter((v) => Number.isInteger(v) && v >= 1))];
  const steps = counts.length === 1 ? counts[0] : null; // several samplers with different counts: show percent
  let cfg = { state: "unknown", reason: null };
  if (samplers.some((n) => inputLinked(n, "negative"))) cfg = { state: "on", reason: null };
  else if (samplers.length) cfg = { state: "off", reason: "no negative connected" };
  else if (cores.length) cfg = { state: "off", reason: "core samplers use their own cfg" };
  return { samplers: samplers.map((n) => n.id), steps, cfg };
}

/** About `count` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart). */
export function niceTicks(lo, hi, count = 4) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toFixed(10)));
  return ticks;
}

function widgetSettings(node) {
  const settings = {};
  for (const w of node.widgets ?? []) settings[w.name] = w.value;
  return settings;
}

/** Bottom edge (node-local y) of the last widget, or null before the canvas has laid the widgets out. */
function widgetsBottom(node) {
  let bottom = null;
  for (const w of node.widgets ?? []) {
    if (w.hidden) continue;
    if (typeof w.y !== "number" || typeof w.computedHeight !== "number") return null;
    bottom = Math.max(bottom ?? 0, w.y + w.computedHeight);
  }
  return bottom;
}

function yRange(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) return [lo - 1, hi + 1];
  const pad = (hi - lo) * 0.12;
  return [lo - pad, hi + pad];
}

function formatValue(v) {
  return Math.abs(v) >= 10 ? v.toFixed(0) : v.toFixed(1);
}

/** X-axis ticks: the sampler's steps (1-based labels at the first, middle and last step) or progress in %. */
function xAxis(steps) {
  if (steps === null) {
    return { title: "progress", ticks: PERCENT_TICKS.map((p) => ({ p, label: `${Math.round(p * 100)}%` })) };
  }
  const progress = stepProgress(steps);
  const labelled = new Set([0, steps - 1, Math.round((steps - 1) / 2)]);
  return {
    title: `step (of ${steps})`,
    ticks: progress.map((p, i) => ({ p, label: labelled.has(i) ? `${i + 1}` : null })),
  };
}

function drawAxes(ctx, curve, plot, px, py) {
  const { x, y } = curve.axes;
  ctx.strokeStyle = AXIS_COLOR;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(plot.x, plot.y);
  ctx.lineTo(plot.x, plot.y + plot.h);
  ctx.lineTo(plot.x + plot.w, plot.y + plot.h);
  ctx.stroke();
  ctx.fillStyle = LABEL_COLOR;
  ctx.textAlign = "center";
  ctx.beginPath();
  for (const tick of x.ticks) {
    const tx = px(tick.p);
    const long = tick.label !== null;
    ctx.moveTo(tx, plot.y + plot.h);
    ctx.lineTo(tx, plot.y + plot.h + (long ? 4 : 2.5));
  }
  ctx.stroke();
  for (const tick of x.ticks) {
    if (tick.label !== null) ctx.fillText(tick.label, px(tick.p), plot.y + plot.h + 13);
  }
  ctx.fillText(x.title, plot.x + plot.w / 2, plot.y + plot.h + 22);
  ctx.textAlign = "right";
  ctx.beginPath();
  for (const tick of y.ticks) {
    ctx.moveTo(plot.x - 3, py(tick.v));
    ctx.lineTo(plot.x, py(tick.v));
  }
  ctx.stroke();
  for (const tick of y.ticks) ctx.fillText(tick.label, plot.x - 5, py(tick.v) + 3.5);
  ctx.save();
  ctx.translate(MARGIN + 8, plot.y + plot.h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText(y.title, 0, 0);
  ctx.restore();
}

function drawCfgWindow(ctx, curve, plot, px) {
  const [a, b] = curve.cfgWindow;
  const left = px(a);
  const width = Math.max(px(b) - px(a), 1);
  ctx.fillStyle = CFG_COLOR;
  ctx.fillRect(left, plot.y, width, plot.h);
  const scale = curve.settings.cfg_scale.toFixed(1);
  let label = `CFG ${scale}`;
  if (curve.cfg.state === "off") {
    // hatched: the window is where true CFG would run, but the sampler will not run it
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, plot.y, width, plot.h);
    ctx.clip();
    ctx.strokeStyle = CFG_OFF_HATCH;
    ctx.lineWidth = 2;
    ctx.beginPath();
    for (let x = left - plot.h; x < left + width; x += 8) {
      ctx.moveTo(x, plot.y + plot.h);
      ctx.lineTo(x + plot.h, plot.y);
    }
    ctx.stroke();
    ctx.restore();
    label = `CFG ${scale} off: ${curve.cfg.reason}`;
  }
  curve.cfgLabel = label;
  ctx.fillStyle = curve.cfg.state === "off" ? WARN_COLOR : LABEL_COLOR;
  ctx.textAlign = "left";
  const textWidth = Math.min(ctx.measureText(label).width, plot.w - 6);
  const x = Math.max(plot.x + 3, Math.min(left + 3, plot.x + plot.w - 3 - textWidth));
  ctx.fillText(label, x, plot.y + plot.h - 4, plot.w - 6);
}

function drawStepMarks(ctx, curve, plot, px, py) {
  if (curve.steps === null) return;
  const progress = stepProgress(curve.steps);
  const every = Math.max(1, Math.ceil(curve.steps / (plot.w * MAX_STEP_MARKS_PER_PIXEL)));
  curve.stepMarks = [];
  ctx.strokeStyle = STEP_COLOR;
  ctx.lineWidth = 1.25;
  progress.forEach((p, i) => {
    if (i % every !== 0 && i !== curve.steps - 1) return;
    const v = valueAt(curve.settings, p);
    curve.stepMarks.push([p, v]);
    ctx.beginPath();
    ctx.arc(px(p), py(v), STEP_RING, 0, 2 * Math.PI);
    ctx.stroke();
  });
}

function drawCurve(node, ctx) {
  const bottom = widgetsBottom(node);
  if (bottom === null) {
    node.setDirtyCanvas(true, false); // widgets get their positions in this frame: draw the plot in the next
    return;
  }
  const curve = sampleCurve(widgetSettings(node));
  const use = scheduleUse(node);
  curve.steps = use.steps;
  curve.cfg = use.cfg;
  curve.samplers = use.samplers;
  const top = bottom + 6;
  const plot = {
    x: MARGIN + GUTTER, y: top + 4, w: node.size[0] - 2 * MARGIN - GUTTER - 6,
    h: node.size[1] - top - MARGIN - AXIS_ROOM - 4,
  };
  curve.plot = plot;
  node.fluxworksCurve = curve;
  if (plot.w < 20 || plot.h < 20) return;

  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
  ctx.beginPath();
  ctx.roundRect(MARGIN, top, node.size[0] - 2 * MARGIN, node.size[1] - top - MARGIN, 4);
  ctx.fill();
  ctx.font = "10px Arial";
  if (curve.error) {
    ctx.fillStyle = ERROR_COLOR;
    ctx.textAlign = "center";
    ctx.fillText(curve.error, node.size[0] / 2, plot.y + plot.h / 2, plot.w);
    ctx.restore();
    return;
  }
  const [lo, hi] = yRange(curve.values);
  curve.yRange = [lo, hi];
  const px = (p) => plot.x + p * plot.w;
  const py = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
  curve.axes = {
    x: xAxis(curve.steps),
    y: { title: "guidance", ticks: niceTicks(lo, hi, 3).map((v) => ({ v, label: formatValue(v) })) },
  };

  if (curve.cfgWindow) drawCfgWindow(ctx, curve, plot, px);
  if (curve.settings.shape !== "constant") {
    ctx.strokeStyle = "rgba(255, 255, 255, 0.18)";
    ctx.setLineDash([3, 3]);
    ctx.lineWidth = 1;
    for (const p of [curve.settings.start_percent, curve.settings.end_percent]) {
      ctx.beginPath();
      ctx.moveTo(px(p), plot.y);
      ctx.lineTo(px(p), plot.y + plot.h);
      ctx.stroke();
    }
    ctx.setLineDash([]);
  }
  drawAxes(ctx, curve, plot, px, py);
  drawStepMarks(ctx, curve, plot, px, py); // under the curve, which stays unbroken through each ring
  ctx.strokeStyle = CURVE_COLOR;
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.beginPath();
  curve.values.forEach((v, i) => {
    const x = px(curve.progress[i]);
    if (i === 0) ctx.moveTo(x, py(v));
    else ctx.lineTo(x, py(v));
  });
  ctx.stroke();
  ctx.restore();
}

/** Greys out the sampler's `guidance` widget, with a note, while a guidance_schedule is linked (it is unused). */
function showScheduleOverride(node) {
  const widget = node.widgets?.find((w) => w.name === "guidance");
  if (!widget) return;
  const scheduled = inputLinked(node, "guidance_schedule");
  if (scheduled === Boolean(widget.fluxworksOverridden)) return;
  if (scheduled) {
    widget.fluxworksOverridden = { label: widget.label, tooltip: widget.tooltip };
    widget.disabled = true;
    widget.label = "guidance: set by the schedule";
    widget.tooltip = GUIDANCE_NOTE;
  } else {
    widget.disabled = false;
    widget.label = widget.fluxworksOverridden.label;
    widget.tooltip = widget.fluxworksOverridden.tooltip;
    widget.fluxworksOverridden = null;
  }
  node.setDirtyCanvas(true, true);
}

function registerSampler(nodeType) {
  for (const hook of ["onNodeCreated", "onConfigure", "onConnectionsChange"]) {
    const previous = nodeType.prototype[hook];
    nodeType.prototype[hook] = function () {
      const result = previous?.apply(this, arguments);
      showScheduleOverride(this);
      this.graph?.setDirtyCanvas?.(true, true); // the schedule feeding it redraws its CFG state and step marks
      return result;
    };
  }
}

app.registerExtension({
  name: "FluxWorks.GuidanceCurve",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SAMPLER_TYPE) registerSampler(nodeType);
    if (nodeData.name !== NODE_TYPE) return;

    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize.apply(this, arguments);
      return [Math.max(size[0], 300), size[1] + PLOT_HEIGHT];
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      for (const widget of this.widgets ?? []) {
        const callback = widget.callback;
        widget.callback = function () {
          const r = callback?.apply(this, arguments);
          node.setDirtyCanvas(true, true);
          return r;
        };
      }
      const [w, h] = this.computeSize();
      this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      return result;
    };

    // Workflows saved before this extension (or by hand) may carry a size without room for the plot.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const [w, h] = this.computeSize();
      if (this.size[0] < w || this.size[1] < h) this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      return result;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawCurve(this, ctx);
      return result;
    };
  },
});
