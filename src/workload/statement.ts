// What check-migration needs to know about a captured shape's text before it
// sends it to a staging database, read from libpg_query's parse tree:
//
// - plannable text: the normalization turns `date '2024-06-01'` into
//   `date $2`, which libpg_query parses but PostgreSQL does not (a typed
//   literal takes a string, not a parameter). Such forms are rewritten as
//   `CAST($2 AS date)`, which plans $2 as a parameter of that type;
// - what each parameter is compared with (`abalance = $1`: the column
//   accounts.abalance), so representative values can come from pg_stats;
//   `LIMIT $2` and `OFFSET $3` are told apart because they need a number,
//   not a column's value;
// - which relations it reads and writes, and with which lock, so a
//   migration's locks can be crossed with the workload.
//
// Pure functions over text; needs loadParser() first.

import { parseSync, scanSync } from 'libpg-query';

type Node = Record<string, unknown>;

/** The lock modes of PostgreSQL's table-level locks, weakest first (as pg_locks spells them). */
export const LOCK_MODES = [
  'AccessShareLock',
  'RowShareLock',
  'RowExclusiveLock',
  'ShareUpdateExclusiveLock',
  'ShareLock',
  'ShareRowExclusiveLock',
  'ExclusiveLock',
  'AccessExclusiveLock',
] as const;
export type LockMode = (typeof LOCK_MODES)[number];

export interface ParameterUse {
  readonly number: number;
  /** compare: compared with `column`; limit/offset: a row count; other: anything else. */
  readonly context: 'compare' | 'limit' | 'offset' | 'other';
  /** The column it is compared with; relation null when the column was not qualified. */
  readonly column: { readonly relation: RelationName | null; readonly name: string } | null;
}

export interface RelationName {
  readonly schema: string | null;
  readonly name: string;
}

export interface RelationUse extends RelationName {
  /** The table-level lock the statement takes on it when it runs. */
  readonly lock: LockMode;
}

export interface StatementAnalysis {
  /** The text to send to PostgreSQL (typed literals rewritten); the input when nothing needed it. */
  readonly text: string;
  /** How many typed-literal parameters were rewritten as CAST($n AS type). */
  readonly typedLiterals: number;
  /** Highest $n. */
  readonly paramCount: number;
  /** One entry per $n that appears, by number. */
  readonly params: readonly ParameterUse[];
  /** Relations named in the statement (CTE names excluded), with the lock each takes. */
  readonly relations: readonly RelationUse[];
}

/** Analyzes a normalized shape's text; throws (the parser's error) if it does not parse. */
export function analyzeStatement(query: string): StatementAnalysis {
  const rewritten = rewriteTypedLiterals(query);
  const tree = parseSync(rewritten.text) as { stmts?: { stmt?: Node }[] };
  const stmt = tree.stmts?.[0]?.stmt ?? {};
  const walker = new Walker();
  walker.statement(stmt);
  walker.resolveQualifiers();
  const params = [...walker.params.values()].sort((a, b) => a.number - b.number);
  return {
    text: rewritten.text,
    typedLiterals: rewritten.count,
    paramCount: walker.maxParam,
    params,
    relations: walker.relationUses(),
  };
}

/**
 * `type $n` (a typed literal whose string the normalization replaced) as
 * `CAST($n AS type)`; interval fields after the parameter (`interval $1 day`)
 * move into the cast. Other text is left byte for byte.
 */
export function rewriteTypedLiterals(query: string): { text: string; count: number } {
  const tree = parseSync(query);
  const spans: { typeStart: number; paramStart: number; number: number }[] = [];
  visit(tree, (key, value) => {
    if (key !== 'TypeCast') return;
    const cast = value as { arg?: Node; typeName?: { location?: number } };
    const param = unwrapParam(cast.arg);
    const typeStart = cast.typeName?.location;
    if (param === null || typeof typeStart !== 'number' || typeStart < 0 || typeStart >= param.location) return;
    spans.push({ typeStart, paramStart: param.location, number: param.number });
  });
  if (spans.length === 0) return { text: query, count: 0 };
  const bytes = Buffer.from(query);
  const tokens = scanSync(query).tokens;
  let out = bytes;
  // From the end, so earlier offsets stay valid.
  for (const span of spans.sort((a, b) => b.typeStart - a.typeStart)) {
    const at = tokens.findIndex((t) => t.start === span.paramStart);
    if (at === -1) continue;
    let end = at;
    const typeText = bytes.toString('utf8', span.typeStart, span.paramStart).trim();
    if (/^interval\b/i.test(typeText)) {
      // interval $1 day, interval $1 hour to minute, interval $1 second(3)
      while (
        end + 1 < tokens.length &&
        (INTERVAL_FIELDS.has(tokens[end + 1].text.toUpperCase()) ||
          (tokens[end + 1].text === '(' && tokens[end + 3]?.text === ')'))
      ) {
        end += tokens[end + 1].text === '(' ? 3 : 1;
      }
    }
    const fields = end > at ? ` ${bytes.toString('utf8', tokens[at + 1].start, tokens[end].end)}` : '';
    const replacement = `CAST($${span.number} AS ${typeText}${fields})`;
    out = Buffer.concat([out.subarray(0, span.typeStart), Buffer.from(replacement), out.subarray(tokens[end].end)]);
  }
  return { text: out.toString('utf8'), count: spans.length };
}

const INTERVAL_FIELDS = new Set(['YEAR', 'MONTH', 'DAY', 'HOUR', 'MINUTE', 'SECOND', 'TO']);

function unwrapParam(node: Node | undefined): { number: number; location: number } | null {
  const ref = node?.ParamRef as { number?: number; location?: number } | undefined;
  if (ref === undefined || typeof ref.number !== 'number' || typeof ref.location !== 'number') return null;
  return { number: ref.number, location: ref.location };
}

function visit(node: unknown, fn: (key: string, value: unknown) => void): void {
  if (Array.isArray(node)) {
    for (const item of node) visit(item, fn);
    return;
  }
  if (typeof node !== 'object' || node === null) return;
  for (const [key, value] of Object.entries(node)) {
    fn(key, value);
    visit(value, fn);
  }
}

const COMPARISONS = new Set([
  'AEXPR_OP',
  'AEXPR_OP_ANY',
  'AEXPR_OP_ALL',
  'AEXPR_IN',
  'AEXPR_LIKE',
  'AEXPR_ILIKE',
  'AEXPR_BETWEEN',
  'AEXPR_NOT_BETWEEN',
  'AEXPR_DISTINCT',
  'AEXPR_NOT_DISTINCT',
]);

const COMPARISON_OPERATORS = new Set(['=', '<', '>', '<=', '>=', '<>', '!=']);

/** One pass over a statement's tree: parameters and their contexts, relations and their locks. */
class Walker {
  maxParam = 0;
  readonly params = new Map<number, ParameterUse>();
  private readonly relations: (RelationName & { alias: string | null; lock: LockMode })[] = [];
  private readonly cteNames = new Set<string>();
  /** $n -> the alias or table its column was qualified with, resolved once every relation is known. */
  private readonly qualifiers = new Map<number, string>();

  statement(stmt: Node): void {
    const [type, body] = Object.entries(stmt)[0] ?? ['', {}];
    const node = body as Node;
    const target = node.relation as Node | undefined;
    if (
      target !== undefined &&
      (type === 'InsertStmt' || type === 'UpdateStmt' || type === 'DeleteStmt' || type === 'MergeStmt')
    ) {
      this.addRelation(target, 'RowExclusiveLock');
    }
    this.walk(stmt);
  }

  relationUses(): RelationUse[] {
    // The strongest lock per relation; CTE references are not relations.
    const out = new Map<string, RelationUse>();
    for (const r of this.relations) {
      if (r.schema === null && this.cteNames.has(r.name)) continue;
      const key = `${r.schema ?? ''}.${r.name}`;
      const known = out.get(key);
      if (known === undefined || LOCK_MODES.indexOf(r.lock) > LOCK_MODES.indexOf(known.lock))
        out.set(key, { schema: r.schema, name: r.name, lock: r.lock });
    }
    return [...out.values()];
  }

  private walk(node: unknown): void {
    if (Array.isArray(node)) {
      for (const item of node) this.walk(item);
      return;
    }
    if (typeof node !== 'object' || node === null) return;
    for (const [key, value] of Object.entries(node as Node)) {
      if (key === 'ParamRef') {
        const number = (value as { number?: number }).number;
        if (typeof number === 'number') {
          if (number > this.maxParam) this.maxParam = number;
          if (!this.params.has(number)) this.params.set(number, { number, context: 'other', column: null });
        }
        continue;
      }
      if (key === 'RangeVar') this.addRelation(value as Node, 'AccessShareLock');
      if (key === 'CommonTableExpr') {
        const name = (value as { ctename?: string }).ctename;
        if (typeof name === 'string') this.cteNames.add(name);
      }
      if (key === 'SelectStmt') this.select(value as Node);
      if (key === 'A_Expr') this.comparison(value as Node);
      this.walk(value);
    }
  }

  private select(node: Node): void {
    for (const [field, context] of [
      ['limitCount', 'limit'],
      ['limitOffset', 'offset'],
    ] as const) {
      const param = unwrapParam(stripCast(node[field] as Node | undefined));
      if (param !== null) this.setParam(param.number, context, null);
    }
    if (Array.isArray(node.lockingClause) && node.lockingClause.length > 0) {
      // SELECT ... FOR UPDATE/SHARE: ROW SHARE on what it reads.
      const from = this.relations.length;
      this.walk(node.fromClause);
      for (let i = from; i < this.relations.length; i++) this.relations[i].lock = 'RowShareLock';
    }
  }

  private comparison(node: Node): void {
    if (!COMPARISONS.has(String(node.kind))) return;
    if (node.kind === 'AEXPR_OP' || node.kind === 'AEXPR_OP_ANY' || node.kind === 'AEXPR_OP_ALL') {
      const op = ((node.name as Node[] | undefined) ?? [])
        .map((n) => (n.String as { sval?: string } | undefined)?.sval)
        .pop();
      if (op === undefined || !COMPARISON_OPERATORS.has(op)) return;
    }
    const left = stripCast(node.lexpr as Node | undefined);
    const right = node.rexpr as Node | Node[] | undefined;
    const rights = Array.isArray(right)
      ? right
      : ((right as { List?: { items?: Node[] } } | undefined)?.List?.items ?? (right === undefined ? [] : [right]));
    const column = columnOf(left);
    if (column !== null) {
      for (const r of rights) {
        const param = unwrapParam(stripCast(r));
        if (param !== null) this.setParam(param.number, 'compare', column);
      }
      return;
    }
    // $1 = column
    const param = unwrapParam(left);
    const other = rights.length === 1 ? columnOf(stripCast(rights[0])) : null;
    if (param !== null && other !== null) this.setParam(param.number, 'compare', other);
  }

  private setParam(
    number: number,
    context: ParameterUse['context'],
    column: { qualifier: string | null; name: string } | null,
  ): void {
    if (number > this.maxParam) this.maxParam = number;
    const known = this.params.get(number);
    if (known !== undefined && known.context !== 'other') return; // the first use found speaks for it
    this.params.set(number, {
      number,
      context,
      column: column === null ? null : { relation: null, name: column.name },
    });
    if (column?.qualifier != null) this.qualifiers.set(number, column.qualifier);
  }

  private addRelation(node: Node, lock: LockMode): void {
    const name = node.relname;
    if (typeof name !== 'string') return;
    const schema = typeof node.schemaname === 'string' ? node.schemaname : null;
    const alias = ((node.alias as { aliasname?: string } | undefined)?.aliasname ?? null) as string | null;
    this.relations.push({ schema, name, alias, lock });
  }

  /** Called after the walk: qualifiers (aliases or table names) become relation names. */
  resolveQualifiers(): void {
    for (const [number, qualifier] of this.qualifiers) {
      const use = this.params.get(number)!;
      const match =
        this.relations.find((r) => r.alias === qualifier) ??
        this.relations.find((r) => r.alias === null && r.name === qualifier);
      this.params.set(number, {
        ...use,
        column:
          match === undefined ? null : { relation: { schema: match.schema, name: match.name }, name: use.column!.name },
      });
    }
  }
}

function stripCast(node: Node | undefined): Node | undefined {
  let current = node;
  while (current?.TypeCast !== undefined) current = (current.TypeCast as { arg?: Node }).arg;
  return current;
}

function columnOf(node: Node | undefined): { qualifier: string | null; name: string } | null {
  const ref = node?.ColumnRef as { fields?: Node[] } | undefined;
  const names = (ref?.fields ?? []).map((f) => (f.String as { sval?: string } | undefined)?.sval);
  if (names.length === 0 || names.some((n) => typeof n !== 'string')) return null;
  if (names.length === 1) return { qualifier: null, name: names[0]! };
  // schema.table.column or table.column: the table (or alias) qualifies it.
  return { qualifier: names[names.length - 2]!, name: names[names.length - 1]! };
}
