// The loss chart: train loss per step and eval loss, drawn as SVG by hand.
//
// Two series of at most a few thousand points need no chart library: an SVG polyline
// draws them at once, stays sharp at any size, styles from the page's CSS, and its points
// are elements a test (or a screen reader, through <title>) can find.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 760;
const HEIGHT = 300;
const MARGIN = { top: 16, right: 20, bottom: 40, left: 62 };
const MAX_MARKERS = 400; // beyond this the train series is a line without dots
const MAX_LINE_POINTS = 2000; // about the chart's width in device pixels

// Every k-th point and the last one: a long run's line keeps its shape at screen resolution.
function thin(points, limit) {
  if (points.length <= limit) return points;
  const stride = Math.ceil(points.length / limit);
  const kept = points.filter((_, index) => index % stride === 0);
  if (kept.at(-1) !== points.at(-1)) kept.push(points.at(-1));
  return kept;
}

function s(tag, attrs = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

// About `count` round tick values (1, 2 or 5 times a power of ten) covering [low, high].
function ticks(low, high, count) {
  if (!(high > low)) return [low];
  const rough = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= rough);
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(Number(value.toPrecision(12)));
  }
  return values;
}

const format = (value) => (Math.abs(value) >= 100 ? value.toFixed(0) : Number(value.toPrecision(3)).toString());

// train, evaluation: arrays of [step, loss] sorted by step. The x axis spans the steps
// seen so far (a running job's curve uses the whole width, as in TensorBoard).
export function renderLossChart(container, { train, evaluation }) {
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "loss-chart",
    role: "img",
    "aria-label": `Loss per step: ${train.length} train points, ${evaluation.length} eval points`,
    "data-train-points": train.length,
    "data-eval-points": evaluation.length,
  });
  const all = [...train, ...evaluation];
  if (all.length === 0) {
    svg.append(s("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "chart-empty", "text-anchor": "middle" },
      "No loss values yet: the curve appears with the first step."));
    container.replaceChildren(svg);
    return svg;
  }
  // Loops, not Math.max(...points): spreading a long series overflows the call stack.
  let maxStep = 1;
  let low = Infinity;
  let high = -Infinity;
  for (const [step, loss] of all) {
    maxStep = Math.max(maxStep, step);
    low = Math.min(low, loss);
    high = Math.max(high, loss);
  }
  const pad = (high - low) * 0.08 || Math.abs(high) * 0.05 || 1;
  low -= pad;
  high += pad;
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const x = (step) => MARGIN.left + (step / maxStep) * plotWidth;
  const y = (loss) => MARGIN.top + (1 - (loss - low) / (high - low)) * plotHeight;

  const axes = s("g", { class: "axes" });
  for (const value of ticks(low, high, 5)) {
    if (value < low || value > high) continue;
    axes.append(s("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(value), y2: y(value), class: "grid" }));
    axes.append(s("text", { x: MARGIN.left - 8, y: y(value) + 4, "text-anchor": "end" }, format(value)));
  }
  for (const value of ticks(0, maxStep, 8).filter(Number.isInteger)) {
    axes.append(s("line", { x1: x(value), x2: x(value), y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom + 5 }));
    axes.append(s("text", { x: x(value), y: HEIGHT - MARGIN.bottom + 18, "text-anchor": "middle" }, value));
  }
  axes.append(s("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom }));
  axes.append(s("text", { x: MARGIN.left + plotWidth / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis-label" }, "step"));
  axes.append(s("text", { x: 14, y: MARGIN.top + plotHeight / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${MARGIN.top + plotHeight / 2})` }, "loss"));
  svg.append(axes);

  const series = (points, name, radius, markers) => {
    const group = s("g", { class: `series ${name}` });
    if (points.length > 1) {
      const line = thin(points, MAX_LINE_POINTS);
      group.append(s("polyline", { points: line.map(([step, loss]) => `${x(step)},${y(loss)}`).join(" ") }));
    }
    if (markers) {
      for (const [step, loss] of points) {
        const dot = s("circle", { cx: x(step), cy: y(loss), r: radius, class: `${name}-point`,
          "data-step": step, "data-loss": loss });
        dot.append(s("title", {}, `step ${step}: ${name} loss ${format(loss)}`));
        group.append(dot);
      }
    }
    svg.append(group);
  };
  series(train, "train", 2.2, train.length <= MAX_MARKERS);
  series(evaluation, "eval", 4.5, true);

  const legend = s("g", { class: "legend", transform: `translate(${WIDTH - MARGIN.right - 170} ${MARGIN.top + 4})` });
  legend.append(s("line", { x1: 0, x2: 22, y1: 8, y2: 8, class: "train" }));
  legend.append(s("text", { x: 28, y: 12 }, "train loss"));
  legend.append(s("circle", { cx: 100, cy: 8, r: 4.5, class: "eval" }));
  legend.append(s("text", { x: 110, y: 12 }, "eval loss"));
  svg.append(legend);

  container.replaceChildren(svg);
  return svg;
}
