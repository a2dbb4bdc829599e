// A strict reader of the Prometheus text exposition format (version 0.0.4), for
// tests that check /metrics: every line is a HELP or TYPE comment or a sample
// `name{label="value",...} value`; every family has HELP and TYPE before its
// samples, and no series appears twice. Throws with the line number on the first
// violation.

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

export interface MetricFamily {
  readonly name: string;
  readonly help: string;
  readonly type: 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';
  readonly samples: Sample[];
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/** Sample-name suffixes a family of the given type may use besides its own name. */
function familyOf(sampleName: string, families: Map<string, MetricFamily>): MetricFamily | undefined {
  const exact = families.get(sampleName);
  if (exact) return exact;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!sampleName.endsWith(suffix)) continue;
    const family = families.get(sampleName.slice(0, -suffix.length));
    if (family && (family.type === 'histogram' || (family.type === 'summary' && suffix !== '_bucket'))) return family;
  }
  return undefined;
}

export function parsePrometheusText(text: string): Map<string, MetricFamily> {
  const families = new Map<string, MetricFamily>();
  const helps = new Map<string, string>();
  const seriesSeen = new Set<string>();
  let current: MetricFamily | undefined;
  const lines = text.split('\n');
  if (lines[lines.length - 1] !== '') throw new Error('the exposition does not end with a newline');
  lines.pop();

  lines.forEach((line, i) => {
    const fail = (why: string): never => {
      throw new Error(`line ${i + 1}: ${why}: ${JSON.stringify(line)}`);
    };
    if (line === '') return; // blank lines are allowed between families
    if (line.startsWith('#')) {
      const match = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
      if (!match) return; // other comments are allowed and ignored
      const [, kind, name, rest] = match;
      if (!NAME.test(name)) fail('bad metric name');
      if (kind === 'HELP') {
        if (helps.has(name)) fail('second HELP for a family');
        helps.set(name, rest);
      } else {
        if (!TYPES.has(rest)) fail('unknown type');
        if (families.has(name)) fail('second TYPE for a family');
        if (!helps.has(name)) fail('TYPE without a HELP before it');
        current = { name, help: helps.get(name)!, type: rest as MetricFamily['type'], samples: [] };
        families.set(name, current);
      }
      return;
    }
    const sample = parseSample(line, fail);
    const family = familyOf(sample.name, families) ?? fail('sample of a family without HELP and TYPE');
    if (family !== current) fail('sample outside its family group');
    const id = `${sample.name}{${Object.entries(sample.labels)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) => `${k}=${JSON.stringify(v)}`)
      .join(',')}}`;
    if (seriesSeen.has(id)) fail('duplicate series');
    seriesSeen.add(id);
    family.samples.push(sample);
  });
  for (const name of helps.keys()) if (!families.has(name)) throw new Error(`HELP without TYPE for ${name}`);
  return families;
}

function parseSample(line: string, fail: (why: string) => never): Sample {
  const nameEnd = line.search(/[{ ]/);
  if (nameEnd <= 0) fail('no metric name');
  const name = line.slice(0, nameEnd);
  if (!NAME.test(name)) fail('bad metric name');
  const labels: Record<string, string> = {};
  let i = nameEnd;
  if (line[i] === '{') {
    i++;
    while (line[i] !== '}') {
      const eq = line.indexOf('=', i);
      if (eq < 0) fail('label without =');
      const labelName = line.slice(i, eq);
      if (!LABEL_NAME.test(labelName)) fail(`bad label name ${JSON.stringify(labelName)}`);
      if (labelName in labels) fail(`label ${labelName} twice`);
      if (line[eq + 1] !== '"') fail('label value not quoted');
      let value = '';
      let j = eq + 2;
      for (;;) {
        const c = line[j];
        if (c === undefined) fail('unterminated label value');
        if (c === '"') break;
        if (c === '\\') {
          const next = line[j + 1];
          if (next === '\\') value += '\\';
          else if (next === '"') value += '"';
          else if (next === 'n') value += '\n';
          else fail('bad escape in label value');
          j += 2;
          continue;
        }
        value += c;
        j++;
      }
      labels[labelName] = value;
      i = j + 1;
      if (line[i] === ',') i++;
      else if (line[i] !== '}') fail('expected , or } after a label');
    }
    i++;
  }
  if (line[i] !== ' ') fail('expected one space before the value');
  const parts = line.slice(i + 1).split(' ');
  if (parts.length > 2) fail('trailing text after value and timestamp');
  const valueText = parts[0];
  // Prometheus reads values with Go's ParseFloat: NaN and Inf in any case (prom-client writes "Nan").
  const special = /^([+-]?)(nan|inf|infinity)$/i.exec(valueText);
  if (special === null && !/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(valueText)) fail('bad value');
  if (parts.length === 2 && !/^-?\d+$/.test(parts[1])) fail('bad timestamp');
  const value =
    special === null
      ? Number(valueText)
      : special[2].toLowerCase() === 'nan'
        ? Number.NaN
        : special[1] === '-'
          ? -Infinity
          : Infinity;
  return { name, labels, value };
}
