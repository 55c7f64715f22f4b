// Bar charts of the last hour, one bar a minute, drawn as SVG from GET /stats's
// "history" (the server's own per-minute counters; runtime/history.py).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 240;
const HEIGHT = 56;

/** Draw `values` (oldest first) as bars in `figure`'s <svg>; redraws only on change. */
export function drawBars(figure, values, start, step, format = (v) => String(v)) {
  const svg = figure.querySelector("svg");
  const signature = `${start}|${values.join(",")}`;
  if (svg.dataset.signature === signature) return;
  svg.dataset.signature = signature;
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const peak = Math.max(0, ...values);
  const width = WIDTH / Math.max(1, values.length);
  const bars = values.map((value, i) => {
    const rect = document.createElementNS(SVG, "rect");
    const h = peak > 0 ? Math.max(value > 0 ? 1.5 : 0, (value / peak) * (HEIGHT - 2)) : 0;
    rect.setAttribute("x", String(i * width + 0.5));
    rect.setAttribute("y", String(HEIGHT - h));
    rect.setAttribute("width", String(Math.max(0.5, width - 1)));
    rect.setAttribute("height", String(h));
    const title = document.createElementNS(SVG, "title");
    const at = new Date((start + i * step) * 1000).toLocaleTimeString([], {
      hour: "2-digit", minute: "2-digit", hour12: false,
    });
    title.textContent = `${at}: ${format(value)}`;
    rect.append(title);
    return rect;
  });
  const base = document.createElementNS(SVG, "line");
  base.setAttribute("x1", "0");
  base.setAttribute("x2", String(WIDTH));
  base.setAttribute("y1", String(HEIGHT - 0.5));
  base.setAttribute("y2", String(HEIGHT - 0.5));
  base.setAttribute("class", "base");
  svg.replaceChildren(base, ...bars);
}

/** All three charts from one history object; `totals` under each says the hour's sum. */
export function renderCharts(history) {
  if (!history || !Array.isArray(history.succeeded)) return;
  const { start, step } = history;
  const sum = (list) => list.reduce((a, b) => a + b, 0);
  const figures = [
    ["chart-throughput", history.succeeded, (v) => `${v} succeeded`,
      `${sum(history.succeeded).toLocaleString()} in the hour`],
    ["chart-failures", history.failed, (v) => `${v} failed`,
      `${sum(history.failed).toLocaleString()} in the hour`],
    ["chart-wait", history.wait_mean, (v) => `${v.toFixed(3)} s mean wait`,
      `longest ${Math.max(0, ...history.wait_max).toFixed(2)} s`],
  ];
  for (const [id, values, format, total] of figures) {
    const figure = document.getElementById(id);
    drawBars(figure, values, start, step, format);
    const p = figure.querySelector(".chart-total");
    if (p.textContent !== total) p.textContent = total;
  }
}
