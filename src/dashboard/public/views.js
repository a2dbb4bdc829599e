// Renders the dashboard's panels from API JSON (field names as in docs/api.md):
// incident banners, the shapes table, a shape's detail (plans, rules,
// events) and the event timeline. Views take data and callbacks and return or fill
// elements; they keep no state of their own except the shapes table, which updates
// its rows in place so hovering and focus survive the refreshes.

import { fill, fmtAgo, fmtCount, fmtMs, fmtRatio, fmtSeconds, fmtTime, h, oneLine } from './dom.js';

const STATUS_LABELS = {
  ok: 'ok',
  regressed: 'regressed',
  slowed: 'slowed',
  blocked: 'blocked',
  shed: 'shed',
  rerouted: 'rerouted',
  new: 'new',
};

export function statusBadge(status) {
  const known = status in STATUS_LABELS;
  return h(
    'span',
    { class: `badge badge-${known ? status : 'other'}`, 'data-status': status },
    STATUS_LABELS[status] ?? status,
  );
}

const EVENT_LABELS = {
  ddl: 'DDL',
  schema_change: 'schema',
  plan_change: 'plan',
  incident_opened: 'incident',
  incident_resolved: 'resolved',
  rule_added: 'rule',
  rule_removed: 'rule lifted',
  mitigation: 'mitigation',
  setting_change: 'setting',
  statistics_change: 'statistics',
  new_shape: 'new shape',
  admin_action: 'admin',
};

function eventChip(type) {
  return h('span', { class: `chip chip-${type}` }, EVENT_LABELS[type] ?? type);
}

/** "Index Scan using a on t -> Seq Scan on t; ..." as from/to spans per relation. */
export function planHeadline(text) {
  return h(
    'span',
    { class: 'plan-headline' },
    String(text)
      .split('; ')
      .map((part, i) => {
        const [from, to] = part.split(' -> ');
        const pieces =
          to === undefined
            ? [h('span', { class: 'plan-to' }, part)]
            : [
                h('span', { class: 'plan-from' }, from),
                h('span', { class: 'plan-arrow' }, ' → '),
                h('span', { class: 'plan-to' }, to),
              ];
        return [i > 0 ? h('span', { class: 'plan-sep' }, '; ') : null, ...pieces];
      }),
  );
}

/** A DDL seen through the proxy has its time; a catalog change only lies between two checks. */
function causeTime(c) {
  return c.between ? `between ${fmtTime(c.between.from)} and ${fmtTime(c.between.to)}` : fmtTime(c.at);
}

function whenRelativeToOnset(seconds) {
  if (typeof seconds !== 'number') return '';
  if (Math.abs(seconds) < 0.5) return 'at the onset';
  return seconds > 0 ? `${fmtSeconds(seconds)} before the onset` : `${fmtSeconds(seconds)} after the onset`;
}

// ---------------------------------------------------------------- incidents

/**
 * The banners of active incidents, most severe first.
 * actions: { open(fingerprint), block(shape, reason), shed(shape, reason) }
 */
export function renderIncidents(container, incidents, actions) {
  if (incidents.length === 0) {
    fill(
      container,
      h(
        'div',
        { class: 'all-clear' },
        h('span', { class: 'dot dot-ok' }),
        'No active incidents: every tracked shape is within its baseline.',
      ),
    );
    return;
  }
  const sorted = [...incidents].sort((a, b) => (b.severity ?? 0) - (a.severity ?? 0));
  fill(
    container,
    sorted.map((incident) => incidentCard(incident, actions)),
  );
}

const CAUSE_LABELS = {
  ddl: 'DDL',
  schema_change: 'Schema change',
  setting_change: 'Setting',
  statistics_change: 'Statistics',
  lock_wait: 'Lock wait',
  saturation: 'Saturation',
};

/** Cancel / terminate buttons for the session at the head of a lock wait, while it still blocks. */
function blockerActions(cause, actions) {
  const pid = cause.type === 'lock_wait' && !cause.evidence?.released ? cause.evidence?.blockers?.[0]?.pid : undefined;
  if (pid === undefined || !actions.signal) return null;
  return h(
    'span',
    { class: 'cause-actions' },
    h(
      'button',
      {
        class: 'btn btn-small btn-warn',
        type: 'button',
        'data-action': 'cancel-backend',
        onclick: () => actions.signal(pid, 'cancel'),
      },
      `Cancel pid ${pid}`,
    ),
    h(
      'button',
      {
        class: 'btn btn-small btn-danger',
        type: 'button',
        'data-action': 'terminate-backend',
        onclick: () => actions.signal(pid, 'terminate'),
      },
      `Terminate pid ${pid}`,
    ),
  );
}

function incidentCard(incident, actions) {
  const wide = incident.kind === 'database_wide';
  const shape = { fingerprint: incident.fingerprint, query: incident.query };
  const reason = `incident ${incident.id}: ${incident.summary ?? ''}`.slice(0, 1000);
  const detectedAfter = (Date.parse(incident.detected_at) - Date.parse(incident.onset)) / 1000;
  const plan = (incident.causes ?? []).filter((c) => c.type === 'plan_change');
  // Decisive causes (a setting, statistics, a lock, saturation) before the merely nearby ones.
  const schema = (incident.causes ?? [])
    .filter((c) => c.type !== 'plan_change')
    .sort((a, b) => (b.conclusive ? 1 : 0) - (a.conclusive ? 1 : 0));
  const checks = incident.checks ?? (incident.ruled_out ?? []).map((r) => ({ ...r, ruled_out: true }));

  return h(
    'article',
    { class: 'incident', 'data-incident': incident.id, 'data-fingerprint': incident.fingerprint },
    h(
      'header',
      { class: 'incident-head' },
      h('span', { class: 'incident-tag' }, wide ? 'Database-wide' : 'Regression'),
      h(
        'span',
        { class: 'incident-when' },
        wide ? 'most shapes slowed together' : ['root shape ', h('code', {}, incident.fingerprint)],
        ` · started ${fmtTime(incident.onset)} · detected ${Number.isFinite(detectedAfter) ? fmtSeconds(detectedAfter) : '–'} later · ${fmtAgo(incident.onset)}`,
      ),
      wide
        ? null
        : h(
            'span',
            { class: 'incident-actions' },
            h(
              'button',
              {
                class: 'btn btn-small',
                type: 'button',
                'data-action': 'open',
                onclick: () => actions.open(incident.fingerprint),
              },
              'Open shape',
            ),
            h(
              'button',
              {
                class: 'btn btn-small btn-warn',
                type: 'button',
                'data-action': 'shed',
                onclick: () => actions.shed(shape, reason),
              },
              'Shed…',
            ),
            h(
              'button',
              {
                class: 'btn btn-small btn-danger',
                type: 'button',
                'data-action': 'block',
                onclick: () => actions.block(shape, reason),
              },
              'Block…',
            ),
          ),
    ),
    wide
      ? h('div', { class: 'incident-query' }, incident.summary)
      : h('div', { class: 'incident-query', title: incident.query }, oneLine(incident.query)),
    h(
      'div',
      { class: 'incident-grid' },
      h(
        'div',
        { class: 'incident-metric' },
        h('div', { class: 'metric-label' }, wide ? 'p95 of the busiest shape' : 'p95 latency'),
        h(
          'div',
          { class: 'metric-change' },
          h('span', { class: 'metric-before' }, fmtMs(incident.baseline?.p95_ms)),
          h('span', { class: 'metric-arrow' }, ' → '),
          h('span', { class: 'metric-after' }, fmtMs(incident.current?.p95_ms)),
        ),
        h('div', { class: 'metric-ratio' }, `${fmtRatio(incident.severity)} slower`),
        h(
          'div',
          { class: 'metric-small' },
          `p50 ${fmtMs(incident.baseline?.p50_ms)} → ${fmtMs(incident.current?.p50_ms)}`,
          h('br'),
          `calls ${rate(incident.baseline?.rate)} → ${rate(incident.current?.rate)}`,
          incident.peak ? [h('br'), `peak p95 ${fmtMs(incident.peak.p95_ms)} at ${fmtTime(incident.peak.at)}`] : null,
          incident.impact
            ? [
                h('br'),
                `impact: ${incident.impact.shapes} shape${incident.impact.shapes === 1 ? '' : 's'}, ${Math.round((incident.impact.share_of_calls ?? 0) * 100)}% of calls`,
              ]
            : null,
        ),
      ),
      h(
        'div',
        { class: 'incident-causes' },
        h('div', { class: 'section-label' }, 'Suspected causes'),
        plan.length === 0 && schema.length === 0
          ? h(
              'p',
              { class: 'muted' },
              'No plan or schema change found near the onset yet; plans are re-sampled when latency jumps.',
            )
          : null,
        h(
          'div',
          { class: 'cause-list' },
          plan
            .slice(0, 2)
            .map((c) =>
              h(
                'div',
                { class: 'cause cause-plan' },
                h('span', { class: 'cause-kind' }, 'Plan change'),
                h('span', { class: 'cause-text' }, planHeadline(c.diff?.headline ?? c.summary)),
                h('span', { class: 'cause-when' }, `${fmtTime(c.at)} · ${whenRelativeToOnset(c.seconds_before_onset)}`),
              ),
            ),
          schema
            .slice(0, 3)
            .map((c) =>
              h(
                'div',
                { class: `cause cause-schema${c.relevant ? '' : ' cause-nearby'}` },
                h('span', { class: 'cause-kind' }, CAUSE_LABELS[c.type] ?? c.type),
                h('span', { class: 'cause-text' }, c.statement ? h('code', {}, oneLine(c.statement)) : c.summary),
                blockerActions(c, actions),
                h(
                  'span',
                  { class: 'cause-when' },
                  `${causeTime(c)} · ${c.between && c.seconds_before_onset === 0 ? 'the onset is in this window' : whenRelativeToOnset(c.seconds_before_onset)}${c.relevant ? '' : ' · not used by this shape\u2019s plans'}`,
                ),
              ),
            ),
        ),
      ),
      h(
        'div',
        { class: 'incident-checks' },
        h('div', { class: 'section-label' }, 'Ruled out'),
        h(
          'ul',
          { class: 'checks' },
          checks.map((c) =>
            h(
              'li',
              { class: c.ruled_out ? 'check-ok' : 'check-open', title: c.summary },
              h('span', { class: 'check-mark' }, c.ruled_out ? '✓' : '?'),
              h('span', {}, c.summary),
            ),
          ),
        ),
        incident.mitigation
          ? h(
              'div',
              { class: 'mitigation' },
              h('span', { class: 'section-label' }, 'Mitigation '),
              incident.mitigation.action === 'none' && incident.mitigation.refused?.length
                ? `${incident.mitigation.mode}: no mitigation`
                : `${incident.mitigation.mode}: ${incident.mitigation.note}`,
              incident.mitigation.refused?.length
                ? h(
                    'ul',
                    { class: 'mitigation-refused' },
                    incident.mitigation.refused.map((r) =>
                      h(
                        'li',
                        {},
                        'refused ',
                        r.fingerprint ? h('code', {}, r.fingerprint) : 'the incident',
                        `: ${r.reason}`,
                      ),
                    ),
                  )
                : null,
            )
          : null,
      ),
    ),
    victimsList(incident, actions),
  );
}

/** The shapes slowed by the incident's cause, collapsed under one line. */
function victimsList(incident, actions) {
  const victims = incident.victims ?? [];
  if (victims.length === 0) return null;
  const wide = incident.kind === 'database_wide';
  return h(
    'details',
    { class: 'victims' },
    h(
      'summary',
      {},
      `${victims.length} ${wide ? 'shape' : 'victim'}${victims.length === 1 ? '' : 's'} ${wide ? 'slowed' : 'slowed by this shape, with no plan change of their own'}`,
    ),
    h(
      'ul',
      { class: 'victim-list' },
      victims.map((v) =>
        h(
          'li',
          { 'data-victim': v.fingerprint },
          h(
            'button',
            { class: 'btn btn-small btn-ghost', type: 'button', onclick: () => actions.open(v.fingerprint) },
            h('code', {}, v.fingerprint),
          ),
          h('span', { class: 'victim-query', title: v.query }, oneLine(v.query)),
          h(
            'span',
            { class: 'victim-figures' },
            `p95 ${fmtMs(v.baseline_p95_ms)} → ${fmtMs(v.peak_p95_ms)} at worst · ${Math.round(v.share_of_calls * 100)}% of calls`,
          ),
        ),
      ),
    ),
  );
}

/**
 * Resolved incidents, newest first, with what ended them and a postmortem download.
 * actions: { open(fingerprint), postmortem(incident) }
 */
export function renderHistory(container, incidents, actions) {
  if (incidents.length === 0) {
    fill(container, h('p', { class: 'muted' }, 'No resolved incidents yet.'));
    return;
  }
  fill(
    container,
    h(
      'ul',
      { class: 'history' },
      incidents.map((i) =>
        h(
          'li',
          { class: 'history-item', 'data-incident': i.id },
          h(
            'div',
            { class: 'history-head' },
            h('span', { class: 'incident-tag' }, i.kind === 'database_wide' ? 'Database-wide' : 'Regression'),
            i.root
              ? h(
                  'button',
                  { class: 'btn btn-small btn-ghost', type: 'button', onclick: () => actions.open(i.root) },
                  h('code', {}, i.root),
                )
              : null,
            h('span', { class: 'muted' }, `${fmtTime(i.onset)} → ${fmtTime(i.resolved_at)}`),
            h(
              'button',
              {
                class: 'btn btn-small',
                type: 'button',
                'data-action': 'postmortem',
                onclick: () => actions.postmortem(i),
              },
              'Postmortem',
            ),
          ),
          h(
            'div',
            { class: 'history-figures' },
            `p95 ${fmtMs(i.baseline?.p95_ms)} → peak ${fmtMs(i.peak?.p95_ms)}${i.victims?.length ? ` · ${i.victims.length} victim${i.victims.length === 1 ? '' : 's'}` : ''}`,
          ),
          i.resolution
            ? h(
                'div',
                { class: 'history-resolution', title: i.resolution.summary },
                `Resolution: ${i.resolution.summary}`,
              )
            : null,
        ),
      ),
    ),
  );
}

/** " · generic plan (tenant_b)": a prepared statement's plan kind and the plan's schemas, when known. */
function planKind(p) {
  const kind = p.kind ? ` · ${p.kind} plan` : '';
  const schemas = p.schemas?.length && p.schemas.join(',') !== 'public' ? ` (${p.schemas.join(', ')})` : '';
  return `${kind}${schemas}`;
}

function rate(perSecond) {
  return typeof perSecond === 'number' ? `${perSecond < 10 ? perSecond.toFixed(1) : fmtCount(perSecond)}/s` : '–';
}

// ---------------------------------------------------------------- shapes table

const COLUMNS = [
  { key: 'status', label: 'Status', cls: 'col-status' },
  { key: 'query', label: 'Query', cls: 'col-query' },
  { key: 'calls', label: 'Calls', sort: 'calls', num: true, fmt: fmtCount },
  { key: 'errors', label: 'Errors', num: true, fmt: fmtCount },
  { key: 'total_ms', label: 'Total', sort: 'total_time', num: true, fmt: fmtMs },
  { key: 'mean_ms', label: 'Mean', sort: 'mean', num: true, fmt: fmtMs },
  { key: 'p50_ms', label: 'p50', num: true, fmt: fmtMs },
  { key: 'p95_ms', label: 'p95', sort: 'p95', num: true, fmt: fmtMs },
  { key: 'p99_ms', label: 'p99', num: true, fmt: fmtMs },
  { key: 'last_seen', label: 'Last seen', cls: 'col-seen', fmt: (iso) => fmtAgo(iso) },
];

/** The top shapes; sorting is the API's (top N by that key), descending. */
export class ShapesTable {
  constructor(table, { onSort, onSelect }) {
    this.table = table;
    this.rows = new Map();
    this.onSelect = onSelect;
    this.headers = new Map();
    const headRow = h('tr');
    for (const col of COLUMNS) {
      const th = h('th', {
        class: [col.cls, col.num ? 'num' : null].filter(Boolean).join(' ') || null,
        scope: 'col',
        'data-column': col.key,
      });
      if (col.sort) {
        th.append(
          h(
            'button',
            { type: 'button', class: 'sort', 'data-sort': col.sort, onclick: () => onSort(col.sort) },
            col.label,
            h('span', { class: 'sort-mark', 'aria-hidden': 'true' }),
          ),
        );
        this.headers.set(col.sort, th);
      } else th.textContent = col.label;
      headRow.append(th);
    }
    this.body = h('tbody');
    this.empty = h(
      'tr',
      { class: 'empty' },
      h('td', { colspan: COLUMNS.length }, 'No queries seen yet: point an application at pgwarden\u2019s proxy port.'),
    );
    fill(table, h('thead', {}, headRow), this.body);
  }

  setSort(sort) {
    for (const [key, th] of this.headers) {
      if (key === sort) th.setAttribute('aria-sort', 'descending');
      else th.removeAttribute('aria-sort');
    }
  }

  /** `incidents`: active incidents by fingerprint, for the status tooltip. */
  update(shapes, selected, incidents = new Map()) {
    const seen = new Set();
    const ordered = [];
    for (const shape of shapes) {
      seen.add(shape.fingerprint);
      let row = this.rows.get(shape.fingerprint);
      if (!row) {
        row = this.createRow(shape.fingerprint);
        this.rows.set(shape.fingerprint, row);
      }
      this.updateRow(row, shape, incidents.get(shape.fingerprint));
      row.tr.classList.toggle('selected', shape.fingerprint === selected);
      row.tr.setAttribute('aria-selected', String(shape.fingerprint === selected));
      ordered.push(row.tr);
    }
    for (const [fp, row] of this.rows) {
      if (!seen.has(fp)) {
        row.tr.remove();
        this.rows.delete(fp);
      }
    }
    if (ordered.length === 0) this.body.replaceChildren(this.empty);
    else {
      this.empty.remove();
      // Re-append in order; rows already in place are not moved.
      ordered.forEach((tr, i) => {
        if (this.body.children[i] !== tr) this.body.insertBefore(tr, this.body.children[i] ?? null);
      });
    }
  }

  createRow(fingerprint) {
    const cells = {};
    const tr = h('tr', { 'data-fingerprint': fingerprint, tabindex: 0 });
    tr.addEventListener('click', () => this.onSelect(fingerprint));
    tr.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        this.onSelect(fingerprint);
      }
    });
    for (const col of COLUMNS) {
      const td = h('td', {
        class: [col.cls, col.num ? 'num' : null].filter(Boolean).join(' ') || null,
        'data-column': col.key,
      });
      cells[col.key] = td;
      tr.append(td);
    }
    return { tr, cells, last: {} };
  }

  updateRow(row, shape, incident) {
    // The table's percentiles cover the shape's whole life; the incident has the current ones.
    row.cells.status.title = incident
      ? `regressed since ${fmtTime(incident.onset)}: p95 ${fmtMs(incident.baseline?.p95_ms)} -> ${fmtMs(incident.current?.p95_ms)}`
      : shape.status === 'ok'
        ? 'within its baseline'
        : shape.new_since
          ? `new since ${fmtTime(shape.new_since)}: slow or heavy from its first calls`
          : shape.status;
    for (const col of COLUMNS) {
      const value = shape[col.key];
      const td = row.cells[col.key];
      if (col.key === 'last_seen') {
        td.textContent = col.fmt(value);
        td.title = fmtTime(value);
        continue;
      }
      if (row.last[col.key] === value) continue;
      row.last[col.key] = value;
      if (col.key === 'status') fill(td, statusBadge(value));
      else if (col.key === 'query') {
        fill(td, h('span', { class: 'query-text' }, oneLine(value)));
        td.title = `${value}\n\nshape ${shape.fingerprint}`;
      } else {
        td.textContent = col.fmt(value);
        td.dataset.value = String(value);
      }
    }
  }
}

// ---------------------------------------------------------------- shape detail

export function shapeStats(shape) {
  const item = (label, value, title) =>
    h(
      'div',
      { class: 'stat', title },
      h('div', { class: 'stat-label' }, label),
      h('div', { class: 'stat-value' }, value),
    );
  const list = (values) => (values?.length ? values.join(', ') : '–');
  return [
    item('Calls', fmtCount(shape.calls)),
    item('Errors', fmtCount(shape.errors)),
    item('Rows', fmtCount(shape.rows)),
    item('Total', fmtMs(shape.total_ms)),
    item('Mean', fmtMs(shape.mean_ms)),
    item('p50', fmtMs(shape.p50_ms)),
    item('p95', fmtMs(shape.p95_ms)),
    item('p99', fmtMs(shape.p99_ms)),
    // The figures above cover the shape's whole life; these are the detector's window.
    shape.detector?.recent
      ? item(
          'p95 now',
          fmtMs(shape.detector.recent.p95_ms),
          'p95 of the last 5 s of calls (the detector\u2019s window)',
        )
      : null,
    shape.detector?.recent
      ? item('p50 now', fmtMs(shape.detector.recent.p50_ms), 'p50 of the last 5 s of calls')
      : null,
    shape.detector?.baseline
      ? item(
          'Baseline p95',
          fmtMs(shape.detector.baseline.p95_ms),
          `from ${String(shape.detector.baseline_from ?? '').replace('_', ' ')}`,
        )
      : null,
    item('First seen', fmtTime(shape.first_seen), shape.first_seen),
    item('Last seen', fmtTime(shape.last_seen), shape.last_seen),
    item('Users', list(shape.users), list(shape.users)),
    item('Databases', list(shape.databases), list(shape.databases)),
    item('Applications', list(shape.application_names), list(shape.application_names)),
  ];
}

export function renderPlans(container, plans) {
  if (!plans) {
    fill(container, h('p', { class: 'muted' }, 'No plans: EXPLAIN sampling needs monitor_url in the configuration.'));
    return;
  }
  const changes = [...(plans.changes ?? [])].reverse();
  const others = (plans.history ?? []).filter((p) => p.fingerprint !== plans.current?.fingerprint);
  const samples = (n) => `${fmtCount(n)} sample${n === 1 ? '' : 's'}`;
  fill(
    container,
    plans.last_error ? h('p', { class: 'warning' }, `Last EXPLAIN failed: ${plans.last_error}`) : null,
    plans.not_sampled
      ? h('p', { class: 'warning' }, `Not explained: ${plans.not_sampled.replace(/^not sampled: /, '')}`)
      : null,
    plans.current
      ? h(
          'div',
          { class: 'plan-current' },
          h(
            'div',
            { class: 'plan-meta' },
            h('strong', {}, 'Current plan'),
            ` ${plans.current.fingerprint}${planKind(plans.current)} · cost ${plans.current.total_cost} · ${samples(plans.current.samples)} · since ${fmtTime(plans.current.first_seen)}`,
          ),
          h(
            'ol',
            { class: 'plan-nodes' },
            plans.current.nodes.map((n) => h('li', {}, n)),
          ),
        )
      : h('p', { class: 'muted' }, 'Not explained yet.'),
    changes.length
      ? h(
          'div',
          { class: 'plan-changes' },
          h('div', { class: 'section-label' }, 'Plan changes'),
          changes.map((c) =>
            h(
              'div',
              { class: 'plan-change' },
              h(
                'div',
                { class: 'plan-change-head' },
                h('span', { class: 'muted' }, fmtTime(c.at)),
                ' ',
                planHeadline(c.headline || `${c.before ?? c.from} -> ${c.after ?? c.to}`),
              ),
              h(
                'ul',
                { class: 'diff' },
                (c.removed ?? []).map((n) => h('li', { class: 'diff-removed' }, `- ${n}`)),
                (c.added ?? []).map((n) => h('li', { class: 'diff-added' }, `+ ${n}`)),
              ),
            ),
          ),
        )
      : null,
    others.length
      ? h(
          'div',
          { class: 'plan-history' },
          h('div', { class: 'section-label' }, 'Other plans seen'),
          h(
            'ul',
            {},
            others.map((p) =>
              h(
                'li',
                { title: p.nodes.join('\n') },
                h('code', {}, p.fingerprint),
                `${planKind(p)} ${p.nodes[0] ?? ''} · ${samples(p.samples)} · ${fmtTime(p.first_seen)} – ${fmtTime(p.last_seen)}`,
              ),
            ),
          ),
        )
      : null,
  );
}

export function renderRules(container, rules, onLift) {
  if (!rules || rules.length === 0) {
    fill(container, h('p', { class: 'muted' }, 'No rules on this shape.'));
    return;
  }
  fill(
    container,
    h(
      'ul',
      { class: 'rules' },
      rules.map((r) =>
        h(
          'li',
          { class: 'rule', 'data-rule': r.id },
          h(
            'div',
            { class: 'rule-main' },
            statusBadge(r.action === 'block' ? 'blocked' : r.action === 'shed' ? 'shed' : 'rerouted'),
            h('span', { class: 'rule-reason', title: r.reason }, r.reason),
            h(
              'div',
              { class: 'rule-meta' },
              [
                r.action === 'shed' ? `max ${r.max_concurrent} at once` : null,
                r.action === 'reroute' ? `to ${r.target}` : null,
                `by ${r.created_by}`,
                `at ${fmtTime(r.created_at)}`,
                r.expires_at ? `expires ${fmtTime(r.expires_at)}` : 'no expiry',
                r.id,
              ]
                .filter(Boolean)
                .join(' · '),
            ),
          ),
          h(
            'button',
            { type: 'button', class: 'btn btn-small', 'data-action': 'lift', onclick: () => onLift(r) },
            r.action === 'block' ? 'Unblock' : 'Lift',
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------- events

/** Events newest first; `onShape` makes an event's shape clickable. */
export function renderEvents(container, events, onShape, { compact = false } = {}) {
  if (!events || events.length === 0) {
    fill(container, h('p', { class: 'muted' }, 'No events yet.'));
    return;
  }
  fill(
    container,
    h(
      'ol',
      { class: `events${compact ? ' events-compact' : ''}` },
      [...events]
        .reverse()
        .map((e) =>
          h(
            'li',
            { class: `event event-${e.type}`, 'data-type': e.type },
            h(
              'div',
              { class: 'event-head' },
              h('time', { datetime: e.at, title: e.at }, fmtTime(e.at)),
              eventChip(e.type),
            ),
            h(
              'div',
              { class: 'event-body' },
              h(
                'div',
                { class: e.type === 'ddl' ? 'event-summary mono' : 'event-summary', title: e.summary },
                e.type === 'plan_change' ? planHeadline(e.summary) : e.summary,
              ),
              e.fingerprint && onShape
                ? h(
                    'button',
                    { type: 'button', class: 'link', onclick: () => onShape(e.fingerprint) },
                    `shape ${e.fingerprint}`,
                  )
                : null,
            ),
          ),
        ),
    ),
  );
}

// ---------------------------------------------------------------- unseen rules

/**
 * Rules on fingerprints this instance has never seen, kept apart: a rule on a
 * mistyped fingerprint contains nothing, and no shape detail would ever show it.
 */
export function renderUnseenRules(container, rules, onLift) {
  fill(
    container,
    h(
      'p',
      { class: 'muted' },
      'No shape with these fingerprints has been seen by this instance: a typo, or a shape that has not run here yet.',
    ),
    h(
      'ul',
      { class: 'rules' },
      rules.map((r) =>
        h(
          'li',
          { class: 'rule', 'data-rule': r.id },
          h(
            'div',
            { class: 'rule-main' },
            statusBadge(r.action === 'block' ? 'blocked' : r.action === 'shed' ? 'shed' : 'rerouted'),
            h('code', {}, r.fingerprint),
            h(
              'div',
              { class: 'rule-meta' },
              [`by ${r.created_by}`, r.expires_at ? `expires ${fmtTime(r.expires_at)}` : 'no expiry', r.id].join(' · '),
            ),
          ),
          h(
            'button',
            { type: 'button', class: 'btn btn-small', 'data-action': 'lift', onclick: () => onLift(r) },
            'Lift',
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------- sessions

const STATE_CLASS = {
  active: 'state-active',
  'idle in transaction': 'state-idle-tx',
  'idle in transaction (aborted)': 'state-idle-tx',
};

function duration(ms) {
  if (ms < 1000) return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} kB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** The live sessions table, as PgBouncer's SHOW CLIENTS; `actions.cancel` and `actions.terminate` take a session. */
export function renderSessions(container, sessions, actions) {
  if (!sessions || sessions.length === 0) {
    fill(container, h('p', { class: 'muted' }, 'No client sessions.'));
    return;
  }
  fill(
    container,
    h(
      'table',
      { class: 'sessions' },
      h(
        'thead',
        {},
        h(
          'tr',
          {},
          ['Client', 'User / db', 'App', 'Since', 'State', 'Statement', 'For', 'In / out', ''].map((t) =>
            h('th', {}, t),
          ),
        ),
      ),
      h(
        'tbody',
        {},
        sessions.map((s) =>
          h(
            'tr',
            { 'data-session': s.id },
            h('td', { class: 'mono' }, s.client_address),
            h('td', {}, `${s.user} / ${s.database}`),
            h('td', {}, s.application_name || '–'),
            h('td', { title: s.since }, fmtTime(s.since)),
            h('td', {}, h('span', { class: `session-state ${STATE_CLASS[s.state] ?? ''}` }, s.state)),
            h(
              'td',
              { class: 'session-query', title: s.statement?.query ?? '' },
              s.statement
                ? [
                    s.statement.fingerprint
                      ? h(
                          'button',
                          { type: 'button', class: 'link mono', onclick: () => actions.open(s.statement.fingerprint) },
                          s.statement.fingerprint,
                        )
                      : null,
                    ' ',
                    s.statement.query ?? '',
                  ]
                : '–',
            ),
            h(
              'td',
              { class: 'num' },
              s.statement ? `${duration(s.statement.duration_ms)}${s.statement.running ? '' : ' (last)'}` : '–',
            ),
            h(
              'td',
              { class: 'num', title: `${s.bytes_in} bytes in, ${s.bytes_out} bytes out` },
              `${bytes(s.bytes_in)} / ${bytes(s.bytes_out)}`,
            ),
            h(
              'td',
              { class: 'session-actions' },
              s.state === 'active'
                ? h(
                    'button',
                    {
                      type: 'button',
                      class: 'btn btn-small',
                      'data-action': 'cancel',
                      onclick: () => actions.cancel(s),
                    },
                    'Cancel',
                  )
                : null,
              h(
                'button',
                {
                  type: 'button',
                  class: 'btn btn-small btn-danger',
                  'data-action': 'terminate',
                  onclick: () => actions.terminate(s),
                },
                'Terminate',
              ),
            ),
          ),
        ),
      ),
    ),
  );
}
