// Draws the guidance curve of a FluxWorksGuidanceSchedule node under its widgets and redraws it as they change.
//
// The curve mirrors flux_sampler/guidance.py (GuidanceCurve.value_at, cfg_active and __post_init__'s checks):
// keep the two in step. What was drawn is kept on `node.fluxworksCurve` so tests can compare it with Python.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "FluxWorksGuidanceSchedule";
const SHAPES = ["constant", "linear", "cosine", "exponential", "step"];
const SAMPLES = 101; // progress 0, 0.01, ..., 1: the percent widgets' own resolution
const PLOT_HEIGHT = 120;
const MARGIN = 10;
const GUTTER = 30; // room for the y-axis labels left of the plot
const CURVE_COLOR = "#7fd0ff";
const CFG_COLOR = "rgba(240, 150, 40, 0.30)";
const LABEL_COLOR = "#aaa";
const ERROR_COLOR = "#ff7070";

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

function drawCurve(node, ctx) {
  const bottom = widgetsBottom(node);
  if (bottom === null) {
    node.setDirtyCanvas(true, false); // widgets get their positions in this frame: draw the plot in the next
    return;
  }
  const curve = sampleCurve(widgetSettings(node));
  const top = bottom + 6;
  const plot = { x: MARGIN + GUTTER, y: top, w: node.size[0] - 2 * MARGIN - GUTTER, h: node.size[1] - top - MARGIN };
  curve.plot = plot;
  node.fluxworksCurve = curve;
  if (plot.w < 20 || plot.h < 20) return;

  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
  ctx.beginPath();
  ctx.roundRect(MARGIN, plot.y, node.size[0] - 2 * MARGIN, plot.h, 4);
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

  if (curve.cfgWindow) {
    const [a, b] = curve.cfgWindow;
    ctx.fillStyle = CFG_COLOR;
    ctx.fillRect(px(a), plot.y, Math.max(px(b) - px(a), 1), plot.h);
    ctx.fillStyle = LABEL_COLOR;
    ctx.textAlign = "left";
    ctx.fillText(`CFG ${curve.settings.cfg_scale.toFixed(1)}`, px(a) + 3, plot.y + plot.h - 4);
  }
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

  ctx.fillStyle = LABEL_COLOR;
  ctx.textAlign = "right";
  const vmax = Math.max(...curve.values);
  const vmin = Math.min(...curve.values);
  ctx.fillText(formatValue(vmax), plot.x - 4, py(vmax) + 4);
  if (vmax - vmin > 1e-9) ctx.fillText(formatValue(vmin), plot.x - 4, py(vmin) + 4);
  ctx.restore();
}

app.registerExtension({
  name: "FluxWorks.GuidanceCurve",
  async beforeRegisterNodeDef(nodeType, nodeData) {
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
