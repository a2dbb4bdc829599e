// Confirmation dialogs for the actions that change what clients experience: block
// and shed a shape (with a reason, a TTL and, for shed, the concurrency limit) and
// lift a rule. Nothing is sent until the operator confirms; an API error stays in
// the dialog so the input is not lost.

import { api } from './api.js';
import { h, oneLine } from './dom.js';

const TTLS = [
  ['', 'never (until lifted)'],
  ['900', '15 minutes'],
  ['3600', '1 hour'],
  ['14400', '4 hours'],
  ['86400', '24 hours'],
];

let open = null;

/** Shows a dialog; `submit(form)` runs on confirm and may throw to show an error. */
function dialog({ title, lead, body = [], confirmLabel, danger = true, submit }) {
  close();
  const error = h('p', { class: 'modal-error', role: 'alert', hidden: true });
  const confirmButton = h(
    'button',
    { type: 'submit', class: danger ? 'btn btn-danger' : 'btn btn-primary', 'data-action': 'confirm' },
    confirmLabel,
  );
  const form = h(
    'form',
    { class: 'modal', novalidate: true },
    h('h2', { id: 'modal-title' }, title),
    lead ? h('p', { class: 'modal-lead' }, lead) : null,
    body,
    error,
    h(
      'div',
      { class: 'modal-actions' },
      h('button', { type: 'button', class: 'btn', 'data-action': 'cancel', onclick: close }, 'Cancel'),
      confirmButton,
    ),
  );
  const overlay = h(
    'div',
    { class: 'overlay', id: 'modal', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'modal-title' },
    form,
  );
  overlay.addEventListener('mousedown', (e) => {
    if (e.target === overlay) close();
  });
  const onKey = (e) => {
    if (e.key === 'Escape') close();
  };
  document.addEventListener('keydown', onKey);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    error.hidden = true;
    confirmButton.disabled = true;
    try {
      await submit(form);
      close();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      confirmButton.disabled = false;
    }
  });
  document.body.append(overlay);
  open = { overlay, onKey, previousFocus: document.activeElement };
  (form.querySelector('textarea, input, select') ?? confirmButton).focus();
}

export function close() {
  if (!open) return;
  document.removeEventListener('keydown', open.onKey);
  open.overlay.remove();
  open.previousFocus?.focus?.();
  open = null;
}

export function isOpen() {
  return open !== null;
}

function field(label, control, hint) {
  return h(
    'label',
    { class: 'field' },
    h('span', { class: 'field-label' }, label),
    control,
    hint ? h('span', { class: 'field-hint' }, hint) : null,
  );
}

function numberOrNull(value) {
  return value.trim() === '' ? null : Number(value);
}

/**
 * Block or shed a shape. `shape`: { fingerprint, query }; `reason`: a suggested reason.
 * Resolves after the rule is stored (then calls `done`), or when cancelled.
 */
export function ruleDialog(action, shape, { reason = '', done = () => {} } = {}) {
  const isShed = action === 'shed';
  const body = [
    h('div', { class: 'modal-query', title: shape.query }, oneLine(shape.query)),
    h('p', { class: 'modal-meta' }, 'shape ', h('code', {}, shape.fingerprint)),
    field(
      'Reason',
      h('textarea', { name: 'reason', rows: 2, required: true, maxlength: 1000 }, reason),
      'Shown to clients in the error DETAIL and kept with the rule.',
    ),
    isShed
      ? h(
          'div',
          { class: 'field-row' },
          field(
            'Max concurrent executions',
            h('input', {
              name: 'max_concurrent',
              type: 'number',
              min: 0,
              max: 100000,
              step: 1,
              value: 2,
              required: true,
            }),
          ),
          field(
            'Queue timeout (ms)',
            h('input', {
              name: 'queue_timeout_ms',
              type: 'number',
              min: 0,
              max: 600000,
              step: 1,
              placeholder: 'server default',
            }),
          ),
        )
      : null,
    field(
      'Expires',
      h(
        'select',
        { name: 'ttl_s' },
        TTLS.map(([value, label]) => h('option', { value }, label)),
      ),
    ),
  ];
  dialog({
    title: isShed ? 'Shed this shape?' : 'Block this shape?',
    lead: isShed
      ? 'At most the given number of executions of this shape run at once across pgwarden; the rest wait in a queue and fail with SQLSTATE 53400 when the queue timeout passes.'
      : 'Every execution of this shape through pgwarden will be refused with SQLSTATE 42501 until the rule is lifted or expires.',
    body,
    confirmLabel: isShed ? 'Shed shape' : 'Block shape',
    async submit(form) {
      const data = new FormData(form);
      const reasonText = String(data.get('reason') ?? '').trim();
      if (!reasonText) throw new Error('Give a reason: it tells clients and colleagues why the shape is refused.');
      const rule = { action, fingerprint: shape.fingerprint, reason: reasonText, created_by: 'dashboard' };
      const ttl = String(data.get('ttl_s') ?? '');
      if (ttl) rule.ttl_s = Number(ttl);
      if (isShed) {
        const max = numberOrNull(String(data.get('max_concurrent') ?? ''));
        if (max === null || !Number.isInteger(max) || max < 0)
          throw new Error('Max concurrent executions must be a whole number, 0 or more.');
        rule.max_concurrent = max;
        const timeout = numberOrNull(String(data.get('queue_timeout_ms') ?? ''));
        if (timeout !== null) {
          if (!Number.isInteger(timeout) || timeout < 0)
            throw new Error('Queue timeout must be a whole number of milliseconds.');
          rule.queue_timeout_ms = timeout;
        }
      }
      await api('/api/rules', { method: 'POST', body: rule });
      done();
    },
  });
}

/** Lift a rule (DELETE /api/rules/:id) after confirmation. */
export function liftDialog(rule, shapeQuery, { done = () => {} } = {}) {
  const verb = rule.action === 'block' ? 'Unblock' : 'Lift';
  dialog({
    title: rule.action === 'block' ? 'Unblock this shape?' : `Lift this ${rule.action} rule?`,
    lead: 'Executions of the shape will run normally again at once.',
    body: [
      shapeQuery ? h('div', { class: 'modal-query', title: shapeQuery }, oneLine(shapeQuery)) : null,
      h('p', { class: 'modal-meta' }, 'rule ', h('code', {}, rule.id), ` · ${rule.action} · ${rule.reason}`),
    ],
    confirmLabel: verb,
    danger: false,
    async submit() {
      await api(`/api/rules/${encodeURIComponent(rule.id)}?by=dashboard`, { method: 'DELETE' });
      done();
    },
  });
}

/** Cancel a session's running statement, or terminate the session, after a confirmation. */
export function sessionDialog(kind, session, { done = () => {} } = {}) {
  const cancel = kind === 'cancel';
  dialog({
    title: cancel ? 'Cancel the running statement?' : 'Terminate this session?',
    lead: cancel
      ? 'The statement fails with 57014 (canceled); the session stays connected.'
      : 'The client gets FATAL 57P01 and is disconnected; its open transaction rolls back.',
    body: [
      h(
        'p',
        { class: 'modal-meta' },
        `session ${session.id} · ${session.client_address} · ${session.user} / ${session.database}${session.application_name ? ` · ${session.application_name}` : ''}`,
      ),
      session.statement?.query
        ? h('div', { class: 'modal-query', title: session.statement.query }, oneLine(session.statement.query))
        : null,
    ],
    confirmLabel: cancel ? 'Cancel statement' : 'Terminate',
    danger: !cancel,
    async submit() {
      await api(cancel ? `/api/sessions/${session.id}/query` : `/api/sessions/${session.id}`, { method: 'DELETE' });
      done();
    },
  });
}
