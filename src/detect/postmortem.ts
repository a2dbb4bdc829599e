// An incident as a postmortem timeline in Markdown: what was seen when, the causes
// as attributed, what was checked and ruled out, who was hurt, what the mitigation
// did and what ended it. The document a postmortem's authors otherwise rebuild from
// logs and memory. Pure: the incident record in, text out. Query texts are the
// normalized shapes (no literal values).

import type { Cause, Incident } from './record.ts';

const time = (iso: string | null) => (iso ? `${iso.slice(0, 10)} ${iso.slice(11, 23)} UTC` : '–');
const clockOf = (iso: string) => iso.slice(11, 23);
const ms = (n: number | undefined) => (typeof n === 'number' ? `${n} ms` : '–');
const pct = (share: number) => `${Math.round(share * 1000) / 10}%`;
const seconds = (s: number | null) => (s === null ? '–' : `${Math.round(s * 10) / 10} s`);
/** Table cells cannot hold pipes or newlines. */
const cell = (text: string) => text.replace(/\|/g, '\\|').replace(/\s+/g, ' ').trim();

function causeWhen(c: Cause): string {
  const relative =
    c.seconds_before_onset > 0
      ? `${c.seconds_before_onset} s before the onset`
      : c.seconds_before_onset < 0
        ? `${-c.seconds_before_onset} s after the onset`
        : 'around the onset';
  if (c.kind === 'schema_change')
    return `between ${clockOf(c.between.from)} and ${clockOf(c.between.to)} (${relative}; found by the catalog watch)`;
  return `${clockOf(c.at)} (${relative}${c.kind === 'ddl' ? '; seen through the proxy' : ''})`;
}

function causeText(c: Cause): string {
  if (c.kind === 'ddl') return `DDL \`${c.statement}\``;
  if (c.kind === 'plan_change') return `plan change: ${c.summary}`;
  if (c.kind === 'schema_change') return `schema change: ${c.summary}`;
  return (c as Cause).summary;
}

export function postmortemMarkdown(incident: Incident): string {
  const lines: string[] = [];
  const title = incident.kind === 'database_wide' ? 'database-wide slowdown' : `shape ${incident.root} regressed`;
  lines.push(`# Incident ${incident.id}: ${title}`, '');
  lines.push(`> ${incident.summary}`, '');
  lines.push(
    `- **Status:** ${incident.status}${incident.resolution ? ` (${incident.resolution.reason})` : ''}`,
    `- **Kind:** ${incident.kind === 'shape' ? 'one root shape and the shapes it slowed' : 'most shapes slowed together, no plan change'}`,
    `- **Onset:** ${time(incident.onset)}`,
    `- **Detected:** ${time(incident.detected_at)} (${seconds(incident.detection_s)} after the onset)`,
    `- **Attributed:** ${incident.attributed_at ? `${time(incident.attributed_at)} (${seconds(incident.attribution_s)} after the onset)` : 'not attributed'}`,
    `- **Resolved:** ${time(incident.resolved_at)}`,
  );
  if (incident.root) lines.push(`- **Root shape:** \`${incident.root}\`: \`${cell(incident.query)}\``);
  lines.push('');

  lines.push('## Impact', '');
  const impact = incident.impact;
  lines.push(
    `- ${impact.shapes} shape${impact.shapes === 1 ? '' : 's'} affected, ${pct(impact.share_of_calls)} of all calls at the worst moment`,
    `- Applications: ${impact.applications.length ? impact.applications.join(', ') : '–'}`,
    `- Users: ${impact.users.length ? impact.users.join(', ') : '–'}`,
    `- Databases: ${impact.databases.length ? impact.databases.join(', ') : '–'}`,
    '',
  );

  lines.push(
    `## Latency${incident.kind === 'database_wide' ? ' (the busiest slowed shape)' : ' of the root shape'}`,
    '',
  );
  lines.push('| | p50 | p95 | p99 | calls/s |', '|---|---|---|---|---|');
  const row = (name: string, p: Incident['baseline']) =>
    `| ${name} | ${ms(p.p50_ms)} | ${ms(p.p95_ms)} | ${ms(p.p99_ms)} | ${p.rate} |`;
  lines.push(
    row(`baseline (${incident.baseline_from.replace('_', ' ')})`, incident.baseline),
    row(`peak (${clockOf(incident.peak.at)})`, incident.peak),
    row(incident.status === 'resolved' ? 'at resolution' : 'now', incident.current),
    '',
  );

  lines.push('## Timeline', '', '| time (UTC) | what | |', '|---|---|---|');
  for (const entry of incident.timeline)
    lines.push(`| ${clockOf(entry.at)} | ${entry.what} | ${cell(entry.summary)} |`);
  lines.push('');

  lines.push('## Causes (as attributed)', '');
  if (incident.causes.length === 0) lines.push('No plan, schema or other change was found near the onset.');
  for (const c of incident.causes)
    lines.push(`- ${causeText(c)}, ${causeWhen(c)}${c.relevant ? '' : ' (nearby; not used by the root\u2019s plans)'}`);
  lines.push('');

  lines.push('## Checked', '');
  for (const c of incident.checks) lines.push(`- ${c.ruled_out ? 'Ruled out' : 'Not ruled out'}: ${c.summary}`);
  if (incident.checks.length === 0) lines.push('Nothing checked yet.');
  lines.push('');

  if (incident.victims.length > 0) {
    lines.push(
      '## Victims',
      '',
      'Shapes slowed with no plan change of their own.',
      '',
      '| shape | query | share of calls | baseline p95 | peak p95 | joined |',
      '|---|---|---|---|---|---|',
    );
    for (const v of incident.victims) {
      lines.push(
        `| \`${v.fingerprint}\` | \`${cell(v.query).slice(0, 120)}\` | ${pct(v.share_of_calls)} | ${ms(v.baseline_p95_ms)} | ${ms(v.peak_p95_ms)} | ${clockOf(v.joined_at)} |`,
      );
    }
    lines.push('');
  }

  lines.push('## Mitigation', '');
  lines.push(
    incident.mitigation
      ? `${incident.mitigation.mode}: ${incident.mitigation.note}${incident.mitigation.rule_id ? ` (rule ${incident.mitigation.rule_id})` : ''}`
      : 'None.',
  );
  lines.push('');

  lines.push('## Resolution', '');
  if (!incident.resolution) lines.push('Still active.');
  else {
    lines.push(incident.resolution.summary);
    for (const e of incident.resolution.events) lines.push(`- ${clockOf(e.at)}: ${e.summary}`);
  }
  lines.push('');
  return lines.join('\n');
}
