// Small SVG charts: no library, so nothing to load from anywhere else.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, children = []) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child);
  return node;
}

function title(text) {
  const node = svg("title");
  node.textContent = text;
  return node;
}

// One bar split by share: segments in order, each with a tooltip.
export function stackedBar(segments, label) {
  const total = segments.reduce((sum, s) => sum + Math.max(0, s.value), 0) || 1;
  let x = 0;
  const rects = segments.map((s) => {
    const width = (Math.max(0, s.value) / total) * 100;
    const rect = svg("rect", { x, y: 0, width, height: 10, fill: s.color }, [title(s.title)]);
    x += width;
    return rect;
  });
  return svg("svg", {
    class: "stacked-bar", viewBox: "0 0 100 10", preserveAspectRatio: "none", role: "img", "aria-label": label,
  }, rects);
}

// A single bar from 0 to 1 of the width.
export function meter(fraction, color, label) {
  const width = Math.max(0, Math.min(1, fraction)) * 100;
  return svg("svg", {
    class: "meter", viewBox: "0 0 100 6", preserveAspectRatio: "none", role: "img", "aria-label": label,
  }, [
    svg("rect", { x: 0, y: 0, width: 100, height: 6, class: "meter-track" }),
    svg("rect", { x: 0, y: 0, width, height: 6, fill: color }),
  ]);
}

// Lines of percentages (0 to 100) over time. series: [{name, color, points: [[ms, value|null]]}].
export function percentLines(series, label) {
  const W = 320;
  const H = 120;
  const left = 34;
  const bottom = 14;
  const times = series.flatMap((s) => s.points.map(([t]) => t));
  const t0 = Math.min(...times);
  const t1 = Math.max(...times);
  const span = Math.max(t1 - t0, 1);
  const x = (t) => left + ((t - t0) / span) * (W - left - 4);
  const y = (v) => 4 + (1 - v / 100) * (H - bottom - 4);
  const children = [];
  for (const v of [0, 50, 100]) {
    children.push(svg("line", { x1: left, x2: W - 4, y1: y(v), y2: y(v), class: "grid" }));
    const tick = svg("text", { x: left - 4, y: y(v) + 3, class: "tick", "text-anchor": "end" });
    tick.textContent = `${v}%`;
    children.push(tick);
  }
  const seconds = Math.round(span / 1000);
  const axis = svg("text", { x: W - 4, y: H - 2, class: "tick", "text-anchor": "end" });
  axis.textContent = times.length > 1 ? `last ${seconds} s` : "one sample so far";
  children.push(axis);
  for (const s of series) {
    // A missing value breaks the line instead of dropping it to zero.
    let run = [];
    const runs = [];
    for (const [t, v] of s.points) {
      if (v === null || !Number.isFinite(v)) {
        if (run.length) runs.push(run);
        run = [];
      } else {
        run.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      }
    }
    if (run.length) runs.push(run);
    for (const points of runs) {
      if (points.length === 1) {
        const [cx, cy] = points[0].split(",");
        children.push(svg("circle", { cx, cy, r: 2, fill: s.color }, [title(s.name)]));
      } else {
        children.push(svg("polyline", { points: points.join(" "), fill: "none", stroke: s.color, "stroke-width": 2 }, [title(s.name)]));
      }
    }
  }
  return svg("svg", { class: "line-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label }, children);
}
