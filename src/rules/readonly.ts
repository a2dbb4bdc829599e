// Whether a statement only reads: decided from the parse tree, for reroute. Only a
// plain SELECT (no INTO, no FOR UPDATE/SHARE, no data-modifying WITH) qualifies;
// anything the parser rejects, or more than one statement, does not.

import { parseSync } from 'libpg-query';

type Node = Record<string, unknown>;

export function isReadOnlyStatement(text: string): boolean {
  let stmts: { stmt?: Node }[];
  try {
    stmts = (parseSync(text) as { stmts?: { stmt?: Node }[] }).stmts ?? [];
  } catch {
    return false;
  }
  return stmts.length === 1 && stmts[0].stmt !== undefined && isReadOnlySelect(stmts[0].stmt);
}

function isReadOnlySelect(node: Node): boolean {
  const select = node.SelectStmt as Node | undefined;
  if (!select) return false;
  if (select.intoClause || (Array.isArray(select.lockingClause) && select.lockingClause.length > 0)) return false;
  // Set operations (UNION...) keep their branches in larg/rarg.
  for (const side of ['larg', 'rarg'] as const) {
    const branch = select[side] as Node | undefined;
    if (branch && !isReadOnlySelect({ SelectStmt: branch })) return false;
  }
  const withClause = select.withClause as { ctes?: { CommonTableExpr?: { ctequery?: Node } }[] } | undefined;
  for (const cte of withClause?.ctes ?? []) {
    const query = cte.CommonTableExpr?.ctequery;
    if (!query || !isReadOnlySelect(query)) return false;
  }
  return true;
}
