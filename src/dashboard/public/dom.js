// Small DOM and formatting helpers. Every piece of data reaches the page through
// textContent or an attribute, never through innerHTML, so query texts and DDL
// statements cannot inject markup.

/**
 * Builds an element: h('td', { class: 'num', title: 'x' }, 'text', child).
 * Attributes whose value is null, undefined or false are left out; `on*` functions
 * become event listeners.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, '');
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

const integer = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });

export function fmtCount(n) {
  return typeof n === 'number' && Number.isFinite(n) ? integer.format(n) : '–';
}

/** A latency: 0.31 ms, 3.2 ms, 38 ms, 1.24 s. */
export function fmtMs(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return '–';
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms < 3_600_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

/** How many times slower: 3.4×, 12×, 130×. */
export function fmtRatio(r) {
  if (typeof r !== 'number' || !Number.isFinite(r)) return '–';
  return r < 10 ? `${r.toFixed(1)}×` : `${integer.format(r)}×`;
}

const clock = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit',
  minute: '2-digit',
  second: '2-digit',
  hourCycle: 'h23',
});
const dateClock = new Intl.DateTimeFormat(undefined, {
  month: 'short',
  day: 'numeric',
  hour: '2-digit',
  minute: '2-digit',
  second: '2-digit',
  hourCycle: 'h23',
});

/** A wall-clock time (today: 14:02:11; other days with the date). */
export function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '–';
  return d.toDateString() === new Date().toDateString() ? clock.format(d) : dateClock.format(d);
}

/** How long ago: 4 s ago, 3 min ago. */
export function fmtAgo(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  return `${fmtSeconds(Math.max(0, (now - t) / 1000))} ago`;
}

/** A span of seconds: 12 s, 4 min 10 s, 2 h 5 min. */
export function fmtSeconds(s) {
  const abs = Math.abs(s);
  if (abs < 60) return `${Math.round(abs)} s`;
  if (abs < 3600) {
    const rest = Math.round(abs % 60);
    return `${Math.floor(abs / 60)} min${rest ? ` ${rest} s` : ''}`;
  }
  const rest = Math.round((abs % 3600) / 60);
  return `${Math.floor(abs / 3600)} h${rest ? ` ${rest} min` : ''}`;
}

/** Collapses whitespace so a query fits on one line. */
export function oneLine(text) {
  return String(text ?? '')
    .replace(/\s+/g, ' ')
    .trim();
}
