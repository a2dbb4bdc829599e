// The workload file: what `GET /api/workload` and `pgwarden workload export`
// write and `pgwarden check-migration` reads. One schema for both sides, so a
// file from an older or newer pgwarden is either understood or refused with a
// message naming the field, never half-read. Fields are only ever added, with
// defaults, so files written by an older pgwarden still read.

import { z } from 'zod';

export const WORKLOAD_FORMAT = 'pgwarden-workload/1';

const milliseconds = z.number().min(0);
const paramValue = z.string().nullable();

const WorkloadShapeSchema = z.object({
  fingerprint: z.string().min(1),
  /** Normalized text: constants are $n placeholders. */
  query: z.string().min(1),
  /** First keyword, upper-cased (SELECT, INSERT...). */
  command: z.string(),
  databases: z.array(z.string()).default([]),
  calls: z.number().int().min(0).default(0),
  total_ms: milliseconds.default(0),
  mean_ms: milliseconds.default(0),
  p50_ms: milliseconds.default(0),
  p95_ms: milliseconds.default(0),
  p99_ms: milliseconds.default(0),
  /** The shape's current plan when exported, or null if it had none. */
  plan_fingerprint: z.string().nullable().default(null),
  plan: z.array(z.string()).nullable().default(null),
  /** Parameter type OIDs the client declared in Parse (0: undeclared); null when unknown. */
  param_types: z.array(z.number().int().min(0)).nullable().default(null),
  /** Total cost of that plan, as production's planner estimated it; null when unknown (older files too). */
  plan_cost: z.number().min(0).nullable().default(null),
  /** Relations that plan reads or writes; null when unknown. */
  relations: z.array(z.string()).nullable().default(null),
  /** First and last execution seen (ISO 8601); null in older files. */
  first_seen: z.string().nullable().default(null),
  last_seen: z.string().nullable().default(null),
  /** Calls per second over the last hour seen (or since first seen, if later); null in older files. */
  calls_per_s: z.number().min(0).nullable().default(null),
  /** Values for $1..$n of `query`, one array per execution; only when workload_sample_params is on. */
  samples: z.array(z.array(paramValue)).optional(),
});

const WorkloadSchema = z.object({
  format: z.literal(WORKLOAD_FORMAT, { error: `format must be '${WORKLOAD_FORMAT}'` }),
  generated_at: z.string(),
  shapes: z.array(WorkloadShapeSchema),
});

export type WorkloadShape = z.infer<typeof WorkloadShapeSchema>;
export type Workload = z.infer<typeof WorkloadSchema>;

/** A workload file that cannot be used; the message says which field and why. */
export class WorkloadError extends Error {}

/** Validates parsed JSON as a workload file (defaults filled in). */
export function parseWorkload(json: unknown): Workload {
  const result = WorkloadSchema.safeParse(json);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const where = issue.path.length > 0 ? issue.path.map(String).join('.') : 'the file';
  throw new WorkloadError(`not a pgwarden workload (${WORKLOAD_FORMAT}): ${where}: ${issue.message}`);
}
