// One pino logger for the process; modules take child loggers with their context.
// On a terminal the lines are rendered readable (pino-pretty, in-process and
// synchronous so nothing is lost on exit); elsewhere they are JSON for collectors.
// The level can change at run time (SIGHUP reload): pino children keep the level
// they were created with, so the children are tracked and updated too.

import pino, { type Logger } from 'pino';
import pretty from 'pino-pretty';

export type LogFormat = 'auto' | 'json' | 'pretty';

const children = new WeakMap<Logger, Set<WeakRef<Logger>>>();

export function createLogger(
  level: string,
  format: LogFormat = 'json',
  stream: NodeJS.WritableStream = process.stdout,
): Logger {
  const readable = format === 'pretty' || (format === 'auto' && (stream as { isTTY?: boolean }).isTTY === true);
  const tracked = new Set<WeakRef<Logger>>();
  const log = pino(
    {
      level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      onChild: (child) => tracked.add(new WeakRef(child)),
    },
    readable
      ? pretty({
          destination: stream as never,
          sync: true,
          colorize: (stream as { isTTY?: boolean }).isTTY === true,
          translateTime: 'SYS:HH:MM:ss.l',
          ignore: 'pid,hostname',
        })
      : (stream as never),
  );
  children.set(log, tracked);
  return log;
}

/** Sets the level of a logger made by createLogger and of every child it has. */
export function setLogLevel(log: Logger, level: string): void {
  log.level = level;
  for (const ref of children.get(log) ?? []) {
    const child = ref.deref();
    if (child === undefined) children.get(log)!.delete(ref);
    else child.level = level;
  }
}
