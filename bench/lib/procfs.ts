// CPU time and memory of a process tree, read from /proc.
//
// The benchmark's verdict is CPU per transaction: on a small machine every
// microsecond a proxy spends is taken from PostgreSQL. A proxy may fork workers
// (pgwarden's --workers), so we sum over the whole tree, and add the times of
// children that already exited and were reaped (cutime/cstime of the root).

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

/** Clock ticks per second, the unit of utime/stime in /proc/<pid>/stat. */
export function clockTicksPerSecond(): number {
  try {
    const ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
    return Number.isInteger(ticks) && ticks > 0 ? ticks : 100;
  } catch {
    return 100; // Linux's USER_HZ on every mainstream architecture
  }
}

interface StatFields {
  ppid: number;
  /** utime + stime of the process itself. */
  ownTicks: number;
  /** cutime + cstime: children that exited and were waited for. */
  reapedChildrenTicks: number;
  /** utime, stime; then cutime, cstime (reaped children). */
  split: [number, number, number, number];
}

/**
 * Fields of /proc/<pid>/stat, or undefined when the process is gone. The comm
 * field (2) is in parentheses and may contain spaces, so we split after the
 * last ')': field N is then at index N - 3.
 */
function readStat(pid: number): StatFields | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const field = (n: number): number => Number(rest[n - 3]);
  return {
    ppid: field(4),
    ownTicks: field(14) + field(15),
    reapedChildrenTicks: field(16) + field(17),
    split: [field(14), field(15), field(16), field(17)],
  };
}

/** The PIDs of every live descendant of root (not root itself). */
function descendants(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    const stat = readStat(pid);
    if (!stat) continue;
    const siblings = children.get(stat.ppid);
    if (siblings) siblings.push(pid);
    else children.set(stat.ppid, [pid]);
  }
  const found: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of children.get(queue.shift()!) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

/** CPU time (user + system) consumed so far by root and its descendants, in ticks. */
export function treeCpuTicks(root: number): number {
  const stat = readStat(root);
  if (!stat) throw new Error(`process ${root} is gone`);
  let ticks = stat.ownTicks + stat.reapedChildrenTicks;
  for (const pid of descendants(root)) ticks += readStat(pid)?.ownTicks ?? 0;
  return ticks;
}

/** treeCpuTicks split into user and system (kernel) time: the relay's own code against its syscalls. */
export function treeCpuSplitTicks(root: number): { user: number; system: number } {
  const split = { user: 0, system: 0 };
  for (const pid of [root, ...descendants(root)]) {
    const stat = readStat(pid);
    if (pid === root && !stat) throw new Error(`process ${root} is gone`);
    if (stat === undefined) continue;
    const [user, system, reapedUser, reapedSystem] = stat.split;
    split.user += user + (pid === root ? reapedUser : 0);
    split.system += system + (pid === root ? reapedSystem : 0);
  }
  return split;
}

/** Resident set size of root and its descendants, in KiB (VmRSS of each). */
export function treeRssKib(root: number): number {
  let total = 0;
  for (const pid of [root, ...descendants(root)]) {
    try {
      const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
      const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
      if (match) total += Number(match[1]);
    } catch {
      // Exited between the scan and the read.
    }
  }
  return total;
}
