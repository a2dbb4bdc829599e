// Parameter values for custom plans without a single production literal: the
// staging database's own statistics. A skewed column plans differently for its
// most common value (a Seq Scan) and for a rare one (an Index Scan), and the
// generic plan may be either; production's plan came from production's values.
// So each parameter compared with a column takes, in turn, values pg_stats
// holds for that column (most common value, least common of the common ones,
// the median and the 10th and 90th percentile of the histogram); LIMIT and
// OFFSET take a typical row count; anything else a neutral value of its type.
// The values come from staging and stay in this process: the report names the
// statistic a value came from, never the value.

import type pg from 'pg';
import type { ParameterUse, RelationName, StatementAnalysis } from './statement.ts';

export interface StatsVariant {
  readonly values: (string | null)[];
  /** Which statistics the values came from, e.g. "a rare common value of accounts.abalance". */
  readonly label: string;
}

/** At most this many custom plans per shape. */
const MAX_VARIANTS = 5;

interface ColumnStats {
  readonly relation: string;
  readonly schema: string;
  readonly column: string;
  readonly mcv: readonly string[] | null;
  readonly histogram: readonly string[] | null;
}

/**
 * Variants of values for $1..$n from pg_stats; empty when no parameter is
 * compared with a column that has statistics. `types`: the parameters' types
 * as PostgreSQL inferred them (format_type names).
 */
export async function statsVariants(
  client: pg.ClientBase,
  analysis: StatementAnalysis,
  types: readonly string[],
): Promise<StatsVariant[]> {
  const compared = analysis.params.filter((p) => p.context === 'compare' && p.column !== null);
  if (compared.length === 0 || analysis.relations.length === 0) return [];
  const stats = await columnStats(client, analysis.relations, [...new Set(compared.map((p) => p.column!.name))]);
  const candidates = new Map<number, { value: string; label: string }[]>();
  for (const p of compared) {
    const s = statsFor(stats, p);
    if (s === undefined) continue;
    const list = representatives(s);
    if (list.length > 0) candidates.set(p.number, list);
  }
  const count = Math.min(MAX_VARIANTS, Math.max(0, ...[...candidates.values()].map((c) => c.length)));
  const variants: StatsVariant[] = [];
  for (let k = 0; k < count; k++) {
    const labels: string[] = [];
    const values: (string | null)[] = [];
    for (let n = 1; n <= analysis.paramCount; n++) {
      const list = candidates.get(n);
      if (list !== undefined) {
        const pick = list[k % list.length];
        values.push(pick.value);
        labels.push(pick.label);
      } else {
        values.push(
          neutralValue(
            analysis.params.find((p) => p.number === n),
            types[n - 1],
          ),
        );
      }
    }
    variants.push({ values, label: [...new Set(labels)].join(', ') });
  }
  return variants;
}

async function columnStats(
  client: pg.ClientBase,
  relations: readonly RelationName[],
  columns: readonly string[],
): Promise<ColumnStats[]> {
  const { rows } = await client.query<{
    relation: string;
    schema: string;
    column: string;
    mcv: string[] | null;
    histogram: string[] | null;
  }>(
    `select c.relname as relation, n.nspname as schema, a.attname as column,
            (s.most_common_vals::text)::text[] as mcv, (s.histogram_bounds::text)::text[] as histogram
       from unnest($1::text[], $2::text[]) as r(schema, name)
       join pg_class c on c.oid = case when r.schema is null then to_regclass(quote_ident(r.name)) else to_regclass(quote_ident(r.schema) || '.' || quote_ident(r.name)) end
       join pg_namespace n on n.oid = c.relnamespace
       join pg_attribute a on a.attrelid = c.oid and a.attname = any($3::text[]) and not a.attisdropped
       join pg_type t on t.oid = a.atttypid and t.typcategory <> 'A'
       join pg_stats s on s.schemaname = n.nspname and s.tablename = c.relname and s.attname = a.attname`,
    [relations.map((r) => r.schema), relations.map((r) => r.name), columns],
  );
  return rows;
}

function statsFor(stats: readonly ColumnStats[], p: ParameterUse): ColumnStats | undefined {
  const column = p.column!;
  const matching = stats.filter((s) => s.column === column.name);
  if (column.relation === null) return matching[0];
  return matching.find(
    (s) =>
      s.relation === column.relation!.name &&
      (column.relation!.schema === null || s.schema === column.relation!.schema),
  );
}

function representatives(s: ColumnStats): { value: string; label: string }[] {
  const name = `${s.relation}.${s.column}`;
  const out: { value: string; label: string }[] = [];
  const add = (value: string | undefined, label: string) => {
    if (value !== undefined && !out.some((o) => o.value === value)) out.push({ value, label: `${label} of ${name}` });
  };
  const mcv = s.mcv ?? [];
  const hist = s.histogram ?? [];
  const at = (f: number) => hist[Math.floor((hist.length - 1) * f)];
  add(mcv[0], 'the most common value');
  add(mcv[mcv.length - 1], 'the least common of the most common values');
  if (hist.length > 0) {
    add(at(0.5), 'the median');
    add(at(0.1), 'the 10th percentile');
    add(at(0.9), 'the 90th percentile');
  }
  return out;
}

/** A value of the parameter's type that plans like an ordinary one. */
export function neutralValue(use: ParameterUse | undefined, type: string | undefined): string | null {
  if (use?.context === 'limit') return '10';
  if (use?.context === 'offset') return '0';
  const t = (type ?? '').toLowerCase();
  if (t.endsWith('[]')) return '{}';
  if (/^(smallint|integer|bigint|numeric|real|double precision|oid)/.test(t)) return '1';
  if (t === 'boolean') return 'true';
  if (/^(text|character|name|citext)/.test(t)) return 'x';
  if (/^(date|timestamp)/.test(t)) return '2000-01-01';
  if (/^time/.test(t)) return '12:00';
  if (t.startsWith('interval')) return '1 day';
  if (t === 'uuid') return '00000000-0000-0000-0000-000000000000';
  if (t === 'json' || t === 'jsonb') return '{}';
  return null;
}
