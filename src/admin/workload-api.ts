// GET /api/workload: the captured workload (docs/api.md, Workload) that
// `pgwarden workload export` saves and `pgwarden check-migration` replays.

import { buildWorkload, type WorkloadSources } from '../workload/export.ts';
import type { Route } from './server.ts';

export function workloadRoutes(sources: WorkloadSources): Route[] {
  return [{ method: 'GET', path: '/api/workload', handle: () => ({ status: 200, body: buildWorkload(sources) }) }];
}
