// The dashboard: polls the admin API every few seconds and keeps the page current
// (incident banners, top shapes, the selected shape's detail, the event timeline).
// All state lives here; views.js only renders. The token comes from the URL
// fragment or the login form; a 401 brings the login form back.

import { api, ApiError, apiText, clearToken, getToken, setToken, takeTokenFromFragment, Unauthorized } from './api.js';
import { LatencyChart } from './chart.js';
import { fill, fmtTime, h } from './dom.js';
import { isOpen as modalOpen, liftDialog, ruleDialog, sessionDialog, close as closeModal } from './modal.js';
import {
  renderEvents,
  renderHistory,
  renderIncidents,
  renderPlans,
  renderRules,
  renderSessions,
  renderUnseenRules,
  ShapesTable,
  shapeStats,
  statusBadge,
} from './views.js';

const POLL_MS = 2500;
const SORT_LABELS = { total_time: 'total time', calls: 'calls', p95: 'p95', mean: 'mean' };
const RANGES = [
  [300, 'last 5 min'],
  [900, 'last 15 min'],
  [3600, 'last hour'],
];

const $ = (id) => document.getElementById(id);

const state = {
  sort: 'total_time',
  /** 'fleet': shapes and incidents of every instance sharing the control database. */
  scope: 'instance',
  /** Why the fleet view was switched off (no control database), shown in the hint. */
  scopeNote: '',
  selected: null,
  sinceS: 900,
  shapes: [],
  /** Active incidents by fingerprint. */
  incidents: new Map(),
  timer: null,
  inFlight: null,
  again: false,
  /** JSON of what each panel last rendered, so unchanged panels are left alone. */
  rendered: new Map(),
  detail: null,
};

function changed(key, value) {
  const json = JSON.stringify(value);
  if (state.rendered.get(key) === json) return false;
  state.rendered.set(key, json);
  return true;
}

// ---------------------------------------------------------------- connection and login

function setConnection(kind, text) {
  const el = $('connection');
  el.dataset.state = kind;
  $('connection-text').textContent = text;
}

function showLogin(message) {
  stopPolling();
  closeModal();
  $('app').hidden = true;
  $('signout').hidden = true;
  setConnection('signed-out', 'Signed out');
  $('refreshed').textContent = '';
  const error = $('login-error');
  error.textContent = message ?? '';
  error.hidden = !message;
  $('login').hidden = false;
  $('login-token').value = '';
  $('login-token').focus();
}

function hideLogin() {
  $('login').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('login-token').value.trim();
  if (!token) {
    $('login-error').textContent = 'Enter the admin token.';
    $('login-error').hidden = false;
    return;
  }
  setToken(token);
  start();
});

$('signout').addEventListener('click', () => {
  clearToken();
  showLogin();
});

// ---------------------------------------------------------------- polling

function start() {
  hideLogin();
  setConnection('connecting', 'Connecting…');
  state.rendered.clear();
  refresh();
}

function stopPolling() {
  clearTimeout(state.timer);
  state.timer = null;
}

function schedule() {
  stopPolling();
  state.timer = setTimeout(refresh, POLL_MS);
}

/** One round of API calls; a refresh asked for while one runs happens right after it. */
async function refresh() {
  if (state.inFlight) {
    state.again = true;
    return state.inFlight;
  }
  state.inFlight = (async () => {
    try {
      const selected = state.selected;
      const scope = state.scope === 'fleet' ? '&scope=fleet' : '';
      const [shapes, incidents, history, events, detail, sessions, rules] = await Promise.all([
        api(`/api/shapes?sort=${state.sort}&limit=50${scope}`, { allow404: true }),
        api(`/api/incidents?status=active${scope}`, { allow404: true }),
        api('/api/incidents?status=resolved&limit=20', { allow404: true }),
        api('/api/events?limit=150', { allow404: true }),
        selected
          ? api(`/api/shapes/${encodeURIComponent(selected)}?since_s=${state.sinceS}`, { allow404: true })
          : null,
        api('/api/sessions', { allow404: true }),
        api('/api/rules', { allow404: true }),
      ]);
      render(shapes ?? [], incidents ?? [], events ?? [], selected, detail, shapes === null);
      renderSide(sessions ?? [], rules ?? []);
      if (changed('history', history ?? [])) renderHistory($('history-body'), history ?? [], actions);
      setConnection('live', 'Live');
      $('refreshed').textContent = `updated ${fmtTime(new Date().toISOString())}`;
      schedule();
    } catch (err) {
      if (err instanceof ApiError && err.status === 400 && state.scope === 'fleet') {
        // No control database: back to this instance's view, and say why.
        setScope('instance', err.message);
        schedule();
        return;
      }
      if (err instanceof Unauthorized) {
        showLogin(getToken() ? 'The token was rejected (HTTP 401). Check it and sign in again.' : null);
        if (getToken()) clearToken();
        return;
      }
      setConnection('error', `Connection lost: ${err.message}. Retrying…`);
      schedule();
    }
  })();
  try {
    await state.inFlight;
  } finally {
    state.inFlight = null;
    if (state.again) {
      state.again = false;
      refresh();
    }
  }
}

// ---------------------------------------------------------------- rendering

const actions = {
  open: (fingerprint) => select(fingerprint, { scroll: true }),
  block: (shape, reason) => ruleDialog('block', shape, { reason, done: refresh }),
  shed: (shape, reason) => ruleDialog('shed', shape, { reason, done: refresh }),
  /** Cancels or terminates a blocking backend (audited by the server). */
  async signal(pid, action) {
    if (
      !window.confirm(`${action === 'cancel' ? 'Cancel the statement of' : 'Terminate the session of'} backend ${pid}?`)
    )
      return;
    try {
      await api(`/api/backends/${pid}/${action}`, { method: 'POST', body: { reason: 'from the dashboard' } });
    } catch (err) {
      window.alert(`pgwarden: ${err.message}`);
    }
    refresh();
  },

  /** Downloads the incident's Markdown postmortem (fetched with the token, saved from memory). */
  async postmortem(incident) {
    const text = await apiText(`/api/incidents/${encodeURIComponent(incident.id)}/postmortem`);
    const url = URL.createObjectURL(new Blob([text], { type: 'text/markdown' }));
    const link = h('a', { href: url, download: `${incident.id}-postmortem.md` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  },
};

const table = new ShapesTable($('shapes-table'), {
  onSort(sort) {
    if (sort === state.sort) return;
    state.sort = sort;
    table.setSort(sort);
    refresh();
  },
  onSelect: (fingerprint) => select(fingerprint),
});
table.setSort(state.sort);

function setScope(scope, note = '') {
  state.scope = scope;
  state.scopeNote = note;
  $('scope-fleet').checked = scope === 'fleet';
  state.rendered.delete('incidents');
}
$('scope-fleet').addEventListener('change', (e) => {
  setScope(e.target.checked ? 'fleet' : 'instance');
  refresh();
});

function render(shapes, incidents, events, selected, detail, statsOff) {
  state.shapes = shapes;
  const active = incidents.filter((i) => i.status === 'active');
  if (changed('incidents', active)) renderIncidents($('incidents'), active, actions);
  // A shape's row links to the incident it is the root or a victim of.
  state.incidents = new Map(
    active.flatMap((i) => [...(i.root ? [[i.root, i]] : []), ...(i.victims ?? []).map((v) => [v.fingerprint, i])]),
  );
  table.update(shapes, state.selected, state.incidents);
  const where = state.scope === 'fleet' ? ' over every instance (details: this instance)' : '';
  $('shapes-hint').textContent = statsOff
    ? 'statistics are off (stats: false)'
    : `${state.scopeNote ? `${state.scopeNote} · ` : ''}top ${shapes.length} by ${SORT_LABELS[state.sort]}${where} · click a row for its latency, plans and rules`;
  if (changed('events', events)) renderEvents($('timeline-body'), events, (fp) => select(fp, { scroll: true }));
  renderSummary(shapes, active);
  if (selected && selected === state.selected) renderDetail(detail);
}

/** The live sessions table and, apart, the rules on shapes this instance never saw. */
function renderSide(sessions, rules) {
  $('sessions-hint').textContent =
    `${sessions.length} connected · ${sessions.filter((s) => s.state === 'active').length} active · ${sessions.filter((s) => s.state.startsWith('idle in transaction')).length} idle in transaction`;
  if (changed('sessions', sessions)) {
    renderSessions($('sessions-body'), sessions, {
      open: (fp) => select(fp, { scroll: true }),
      cancel: (s) => sessionDialog('cancel', s, { done: refresh }),
      terminate: (s) => sessionDialog('terminate', s, { done: refresh }),
    });
  }
  const unseen = rules.filter((r) => r.seen === false);
  $('unseen-rules').hidden = unseen.length === 0;
  if (changed('unseen-rules', unseen))
    renderUnseenRules($('unseen-rules-body'), unseen, (rule) => liftDialog(rule, '', { done: refresh }));
}

function renderSummary(shapes, active) {
  const counts = { regressed: 0, blocked: 0, shed: 0, rerouted: 0, new: 0 };
  for (const s of shapes) if (s.status in counts) counts[s.status]++;
  const item = (n, label, cls) =>
    h('span', { class: `summary-item ${cls ?? ''}` }, h('strong', {}, String(n)), ` ${label}`);
  fill(
    $('summary'),
    item(shapes.length, shapes.length === 1 ? 'shape' : 'shapes'),
    item(
      active.length,
      active.length === 1 ? 'active incident' : 'active incidents',
      active.length ? 'summary-alert' : '',
    ),
    counts.blocked ? item(counts.blocked, 'blocked', 'summary-warn') : null,
    counts.shed ? item(counts.shed, 'shed', 'summary-warn') : null,
    counts.rerouted ? item(counts.rerouted, 'rerouted') : null,
    counts.new ? item(counts.new, counts.new === 1 ? 'new slow shape' : 'new slow shapes', 'summary-warn') : null,
  );
}

// ---------------------------------------------------------------- shape detail

function select(fingerprint, { scroll = false } = {}) {
  if (state.selected !== fingerprint) {
    state.selected = fingerprint;
    buildDetail(fingerprint);
    table.update(state.shapes, fingerprint, state.incidents);
  }
  if (scroll) $('detail').scrollIntoView({ behavior: 'smooth', block: 'start' });
  refresh();
}

function closeDetail() {
  state.selected = null;
  state.detail?.chart.destroy();
  state.detail = null;
  $('detail').hidden = true;
  fill($('detail'));
  table.update(state.shapes, null, state.incidents);
}

/** The detail panel's skeleton; its parts are filled by renderDetail on every refresh. */
function buildDetail(fingerprint) {
  state.detail?.chart.destroy();
  for (const key of [...state.rendered.keys()]) if (key.startsWith('detail:')) state.rendered.delete(key);
  const section = $('detail');
  const parts = {
    badge: h('span'),
    query: h('pre', { class: 'detail-query' }),
    stats: h('div', { class: 'stats' }),
    chart: h('div', { class: 'chart', id: 'latency-chart' }),
    plans: h('div', { class: 'detail-plans' }),
    rules: h('div', { class: 'detail-rules' }),
    events: h('div', { class: 'detail-events' }),
    missing: h('p', { class: 'warning', hidden: true }),
  };
  const shapeOf = () =>
    state.detail?.shape ?? state.shapes.find((s) => s.fingerprint === fingerprint) ?? { fingerprint, query: '' };
  const range = h(
    'select',
    { 'aria-label': 'Time range', class: 'select-small' },
    RANGES.map(([s, label]) => h('option', { value: s, selected: s === state.sinceS }, label)),
  );
  range.addEventListener('change', () => {
    state.sinceS = Number(range.value);
    refresh();
  });
  const logToggle = h('input', { type: 'checkbox', checked: true });
  logToggle.addEventListener('change', () => state.detail?.chart.setLog(logToggle.checked));
  fill(
    section,
    h(
      'div',
      { class: 'card-head detail-head' },
      h('h2', { id: 'detail-title' }, 'Shape ', h('code', {}, fingerprint)),
      parts.badge,
      h(
        'span',
        { class: 'detail-actions' },
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-small btn-warn',
            'data-action': 'shed',
            onclick: () => ruleDialog('shed', shapeOf(), { done: refresh }),
          },
          'Shed…',
        ),
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-small btn-danger',
            'data-action': 'block',
            onclick: () => ruleDialog('block', shapeOf(), { done: refresh }),
          },
          'Block…',
        ),
        h(
          'button',
          {
            type: 'button',
            class: 'btn btn-small btn-ghost',
            'aria-label': 'Close shape detail',
            onclick: closeDetail,
          },
          'Close',
        ),
      ),
    ),
    parts.missing,
    parts.query,
    parts.stats,
    h(
      'div',
      { class: 'subcard' },
      h(
        'div',
        { class: 'subcard-head' },
        h('h3', {}, 'Latency'),
        h('span', { class: 'chart-controls' }, h('label', { class: 'check' }, logToggle, ' log scale'), range),
      ),
      parts.chart,
    ),
    h(
      'div',
      { class: 'detail-grid' },
      h('div', { class: 'subcard' }, h('div', { class: 'subcard-head' }, h('h3', {}, 'Plans')), parts.plans),
      h(
        'div',
        { class: 'detail-side' },
        h('div', { class: 'subcard' }, h('div', { class: 'subcard-head' }, h('h3', {}, 'Rules')), parts.rules),
        h(
          'div',
          { class: 'subcard' },
          h('div', { class: 'subcard-head' }, h('h3', {}, 'Events of this shape')),
          parts.events,
        ),
      ),
    ),
  );
  section.hidden = false;
  state.detail = { fingerprint, parts, chart: new LatencyChart(parts.chart), shape: null };
}

function renderDetail(detail) {
  const d = state.detail;
  if (!d) return;
  if (detail === null) {
    d.parts.missing.textContent = 'This shape is no longer tracked (evicted or the registry was reset).';
    d.parts.missing.hidden = false;
    return;
  }
  d.parts.missing.hidden = true;
  d.shape = { fingerprint: detail.fingerprint, query: detail.query };
  if (changed('detail:badge', detail.status)) fill(d.parts.badge, statusBadge(detail.status));
  if (changed('detail:query', detail.query)) d.parts.query.textContent = detail.query;
  fill(d.parts.stats, shapeStats(detail));
  d.chart.update(detail.series ?? [], markersOf(detail));
  if (changed('detail:plans', detail.plans ?? null)) renderPlans(d.parts.plans, detail.plans);
  if (changed('detail:rules', detail.rules ?? [])) {
    renderRules(d.parts.rules, detail.rules ?? [], (rule) => liftDialog(rule, detail.query, { done: refresh }));
  }
  if (changed('detail:events', detail.events ?? []))
    renderEvents(d.parts.events, detail.events ?? [], null, { compact: true });
}

/** Chart markers: the shape's own events, and the schema changes its incidents blame. */
function markersOf(detail) {
  const markers = new Map();
  for (const e of detail.events ?? []) {
    if (['plan_change', 'incident_opened', 'incident_resolved', 'rule_added', 'rule_removed'].includes(e.type))
      markers.set(`e${e.id}`, { t: Date.parse(e.at), type: e.type, summary: e.summary });
  }
  for (const incident of detail.incidents ?? []) {
    for (const c of incident.causes ?? []) {
      if (c.type !== 'plan_change' && c.relevant)
        markers.set(`e${c.event_id}`, { t: Date.parse(c.at), type: c.type, summary: c.summary });
    }
  }
  return [...markers.values()].filter((m) => Number.isFinite(m.t));
}

// ---------------------------------------------------------------- boot

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && getToken() && !modalOpen()) refresh();
});

takeTokenFromFragment();
if (getToken()) start();
else showLogin();
