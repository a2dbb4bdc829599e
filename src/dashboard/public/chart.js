// A shape's latency over time (p50, p95, p99 per series bucket) with uPlot, loaded
// as a classic script before this module (window.uPlot). Plan changes, schema
// changes and incidents of the shape are drawn as labelled vertical markers, so
// the moment a plan flipped sits right on the line that jumped.

const uPlot = globalThis.uPlot;

const SERIES = [
  { label: 'p50', key: 'p50_ms', stroke: '#3b82f6' },
  { label: 'p95', key: 'p95_ms', stroke: '#e8590c' },
  { label: 'p99', key: 'p99_ms', stroke: '#b91c1c' },
];

const MARKER_COLORS = {
  plan_change: '#7c3aed',
  ddl: '#0f766e',
  schema_change: '#0f766e',
  incident_opened: '#b91c1c',
  incident_resolved: '#15803d',
  rule_added: '#475569',
  rule_removed: '#475569',
  mitigation: '#475569',
};

const MARKER_LABELS = {
  plan_change: 'plan',
  ddl: 'DDL',
  schema_change: 'schema',
  incident_opened: 'incident',
  incident_resolved: 'resolved',
  rule_added: 'rule',
  rule_removed: 'rule lifted',
  mitigation: 'mitigation',
};

const fmtWhen = uPlot.fmtDate('{HH}:{mm}:{ss}');

const fmtAxisMs = (ms) => {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return '';
  if (ms >= 1000) return `${+(ms / 1000).toPrecision(3)} s`;
  return ms >= 1 ? `${+ms.toPrecision(3)} ms` : `${+ms.toPrecision(2)} ms`;
};

export class LatencyChart {
  /** @param {HTMLElement} container */
  constructor(container) {
    this.container = container;
    this.markers = [];
    this.log = true;
    this.plot = null;
    this.data = [[], [], [], []];
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(container);
  }

  /** @param points series points from GET /api/shapes/:fp; @param markers [{ t (epoch ms), type, summary }] */
  update(points, markers) {
    // A 0 is a bucket without latency samples (only refused calls): a gap, not a
    // fast bucket; a log scale could not show it anyway.
    const floor = (v) => (typeof v === 'number' && v > 0 ? Math.max(v, 0.001) : null);
    this.data = [points.map((p) => p.t / 1000), ...SERIES.map((s) => points.map((p) => floor(p[s.key])))];
    this.markers = markers.map((m) => ({ ...m, t: m.t / 1000 }));
    if (this.plot === null) this.create();
    else this.plot.setData(this.data);
  }

  setLog(log) {
    if (log === this.log) return;
    this.log = log;
    this.plot?.destroy();
    this.plot = null;
    this.create();
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }

  size() {
    return { width: Math.max(320, Math.floor(this.container.clientWidth)), height: 260 };
  }

  fit() {
    if (this.plot) this.plot.setSize(this.size());
  }

  create() {
    const markers = () => this.markers;
    const axis = {
      stroke: '#5b6472',
      grid: { stroke: '#eceef2', width: 1 },
      ticks: { stroke: '#d9dde3', width: 1 },
      font: '11px system-ui, sans-serif',
    };
    this.plot = new uPlot(
      {
        ...this.size(),
        padding: [2 * LABEL_ROW + 4, 12, 0, 0],
        cursor: { drag: { x: true, y: false }, points: { size: 6 } },
        scales: {
          // At least 30 s wide, so a young shape's few buckets do not get millisecond ticks.
          x: { time: true, range: (_u, min, max) => (max - min < 30 ? [max - 30, max] : [min, max]) },
          y: this.log ? { distr: 3, log: 10 } : { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] },
        },
        axes: [axis, { ...axis, size: 64, values: (_u, ticks) => ticks.map(fmtAxisMs) }],
        // Without the cursor over the plot, the legend shows the newest bucket.
        series: [
          {
            label: 'Bucket',
            value: (_u, v, _s, idx) => (idx == null || v == null ? 'latest' : fmtWhen(new Date(v * 1000))),
          },
          ...SERIES.map((s) => ({
            label: s.label,
            stroke: s.stroke,
            width: 1.75,
            spanGaps: true,
            points: { show: false },
            value: (u, v, sidx, idx) => fmtAxisMs(idx == null ? u.data[sidx][u.data[sidx].length - 1] : v) || '–',
          })),
        ],
        legend: { live: true },
        hooks: { draw: [(u) => drawMarkers(u, markers())] },
      },
      this.data,
      this.container,
    );
  }
}

/** Height of one row of marker labels, in CSS pixels; two rows sit above the plot. */
const LABEL_ROW = 15;

function drawMarkers(u, markers) {
  const ctx = u.ctx;
  const { left, top, width, height } = u.bbox;
  const px = uPlot.pxRatio;
  // Markers closer than a few pixels share one line and one label ("schema, plan").
  const groups = [];
  for (const m of [...markers].sort((a, b) => a.t - b.t)) {
    const x = Math.round(u.valToPos(m.t, 'x', true));
    if (x < left - 1 || x > left + width + 1) continue;
    const label = MARKER_LABELS[m.type] ?? m.type;
    const last = groups[groups.length - 1];
    if (last && x - last.x < 6 * px) {
      if (!last.labels.includes(label)) last.labels.push(label);
    } else groups.push({ x, color: MARKER_COLORS[m.type] ?? '#475569', labels: [label] });
  }
  ctx.save();
  ctx.font = `${11 * px}px system-ui, sans-serif`;
  ctx.textBaseline = 'middle';
  const rowEnds = [-Infinity, -Infinity];
  for (const g of groups) {
    ctx.strokeStyle = g.color;
    ctx.lineWidth = 1 * px;
    ctx.setLineDash([4 * px, 3 * px]);
    ctx.beginPath();
    ctx.moveTo(g.x + 0.5, top);
    ctx.lineTo(g.x + 0.5, top + height);
    ctx.stroke();
    const text = g.labels.join(', ');
    const w = ctx.measureText(text).width;
    // Centred over its line, in the first label row that is free there.
    const lx = Math.max(left, Math.min(g.x - w / 2, left + width - w));
    const row = lx > rowEnds[0] ? 0 : lx > rowEnds[1] ? 1 : 0;
    rowEnds[row] = lx + w + 6 * px;
    const ly = top - (2 - row) * LABEL_ROW * px + (LABEL_ROW * px) / 2;
    ctx.fillStyle = g.color;
    ctx.fillText(text, lx, ly);
  }
  ctx.restore();
}
