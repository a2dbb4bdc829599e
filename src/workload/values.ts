// Sample parameter values for a shape's normalized text. A shape's query has $n
// for the client's own parameters and for every constant the normalization
// replaced, so one execution's values are its Bind parameters followed by the
// literals of the text it ran, in the order the normalization numbered them.
// Only used when the operator opted in (workload_sample_params).

import { normalizeSync, parseSync, scanSync } from 'libpg-query';

type Value = string | null;

/**
 * Values for $1..$n of the normalized form of `text`: `params` for the
 * placeholders the text already had, then its literals. Null when the text is
 * not one parseable statement or its literals cannot be matched one to one (the
 * sample is then better dropped than wrong). Needs loadParser() first.
 */
export function sampleValues(text: string, params: readonly Value[]): Value[] | null {
  let tree: unknown;
  let normalized: string;
  try {
    tree = parseSync(text);
    normalized = normalizeSync(text);
  } catch {
    return null;
  }
  const statements = (tree as { stmts?: unknown[] }).stmts ?? [];
  if (statements.length !== 1) return null;
  const constants = new Map<number, Value>();
  const own = { max: 0 };
  collect(statements[0], constants, own);
  if (params.length < own.max) return null;

  const literals = literalsByNumber(text, normalized, constants, own.max);
  if (literals === null) return null;
  return [...params.slice(0, own.max), ...literals];
}

/** How many parameters a statement takes: its highest $n (0 when none). Throws if it does not parse. */
export function parameterCount(query: string): number {
  const own = { max: 0 };
  collect(parseSync(query), new Map(), own);
  return own.max;
}

/** The literal values, indexed by their placeholder number minus `firstNew`. */
function literalsByNumber(
  text: string,
  normalized: string,
  constants: Map<number, Value>,
  own: number,
): Value[] | null {
  const original = scanSync(text).tokens;
  const replaced = scanSync(normalized).tokens;
  const out: Value[] = [];
  let i = 0;
  for (let j = 0; j < replaced.length; j++) {
    const token = replaced[j];
    const number = token.tokenName === 'PARAM' ? Number(token.text.slice(1)) : 0;
    if (number > own) {
      // The constant's span in the original starts here ("-5" is two tokens).
      const value = i < original.length ? constants.get(original[i].start) : undefined;
      if (value === undefined || out[number - own - 1] !== undefined) return null;
      out[number - own - 1] = value;
      i++;
      const next = replaced[j + 1];
      if (next === undefined) i = original.length;
      else while (i < original.length && original[i].text !== next.text) i++;
      continue;
    }
    if (i >= original.length || original[i].text !== token.text) return null;
    i++;
  }
  if (i !== original.length) return null;
  for (let k = 0; k < out.length; k++) if (out[k] === undefined) return null;
  return out;
}

/** Gathers A_Const values by location and the highest ParamRef number. */
function collect(node: unknown, constants: Map<number, Value>, own: { max: number }): void {
  if (Array.isArray(node)) {
    for (const item of node) collect(item, constants, own);
    return;
  }
  if (typeof node !== 'object' || node === null) return;
  for (const [key, value] of Object.entries(node)) {
    if (key === 'A_Const' && typeof value === 'object' && value !== null) {
      const c = value as Record<string, unknown>;
      if (typeof c.location === 'number') constants.set(c.location, constantValue(c));
    } else if (key === 'ParamRef' && typeof value === 'object' && value !== null) {
      const number = (value as { number?: unknown }).number;
      if (typeof number === 'number' && number > own.max) own.max = number;
    }
    collect(value, constants, own);
  }
}

/** An A_Const as the text a parameter of its type takes (the JSON omits zero values). */
function constantValue(c: Record<string, unknown>): Value {
  if (c.isnull === true) return null;
  const inner = (key: string) => (c[key] as Record<string, unknown> | undefined)?.[key];
  if ('sval' in c) return String(inner('sval') ?? '');
  if ('ival' in c) return String(inner('ival') ?? 0);
  if ('fval' in c) return String(inner('fval') ?? '0');
  if ('boolval' in c) return inner('boolval') === true ? 'true' : 'false';
  if ('bsval' in c) return String(inner('bsval') ?? '');
  return null;
}
