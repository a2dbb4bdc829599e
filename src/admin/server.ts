// The admin HTTP server: health and readiness probes, Prometheus metrics and the
// JSON API. Binds to loopback by default and requires the bearer token on
// everything but /healthz. node:http is enough for a handful of JSON routes; the
// routes themselves live in api.ts.

import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { timingSafeEqual } from 'node:crypto';
import type { Logger } from 'pino';
import type client from 'prom-client';

export interface Route {
  readonly method: 'GET' | 'POST' | 'DELETE';
  /** A path with `:name` segments, e.g. /api/shapes/:fingerprint */
  readonly path: string;
  handle(request: ApiRequest): ApiResponse | Promise<ApiResponse>;
}

export interface ApiRequest {
  readonly params: Record<string, string>;
  readonly query: URLSearchParams;
  readonly body: unknown;
}

export interface ApiResponse {
  readonly status: number;
  readonly body: unknown;
  /** Sends a string body as is with this Content-Type (a Markdown export) instead of as JSON. */
  readonly contentType?: string;
  /** Extra response headers (X-Total-Count of a paged list). */
  readonly headers?: Readonly<Record<string, string>>;
}

/** An API error with its HTTP status and a message that says what is wrong. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export interface AdminOptions {
  readonly host: string;
  readonly port: number;
  readonly token: string;
  readonly metrics: client.Registry;
  readonly routes: readonly Route[];
  /** Whether the upstream accepts connections (for /readyz). */
  readonly upstreamReady: () => Promise<boolean>;
  readonly log: Logger;
  /** The dashboard's files (HTML, script, styles): served without the token, they hold no data. */
  readonly files?: StaticFiles;
  /** Open connections at most; more are answered 503 and closed. Default 64. */
  readonly maxConnections?: number;
}

export interface StaticFiles {
  get(
    pathname: string,
  ): { readonly body: Buffer; readonly headers: Readonly<Record<string, string>>; readonly etag: string } | undefined;
}

const MAX_BODY_BYTES = 1024 * 1024;
const DEFAULT_MAX_CONNECTIONS = 64;
const TOO_MANY_CONNECTIONS = (() => {
  const body = JSON.stringify({ error: 'too many admin connections' });
  return (
    'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n' +
    `Retry-After: 1\r\nConnection: close\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
  );
})();

export class AdminServer {
  private readonly server: http.Server;
  private readonly token: Buffer;

  constructor(private readonly options: AdminOptions) {
    this.token = Buffer.from(options.token);
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((err: Error) => {
        options.log.error({ err, url: req.url }, 'admin request failed');
        if (!res.headersSent) send(res, 500, { error: 'internal error' });
        else res.destroy();
      });
    });
    // Capped, so a flood of idle or slow connections cannot exhaust descriptors or memory.
    const max = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    let open = 0;
    this.server.on('connection', (socket: net.Socket) => {
      open++;
      socket.once('close', () => open--);
      if (open > max) {
        socket.end(TOO_MANY_CONNECTIONS);
        socket.setTimeout(1000, () => socket.destroy());
      }
    });
  }

  async listen(): Promise<net.AddressInfo> {
    this.server.listen(this.options.port, this.options.host);
    await once(this.server, 'listening');
    return this.server.address() as net.AddressInfo;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://admin');
    if (url.pathname === '/healthz') return send(res, 200, { status: 'ok' });
    const file = req.method === 'GET' || req.method === 'HEAD' ? this.options.files?.get(url.pathname) : undefined;
    if (file) {
      if (req.headers['if-none-match'] === file.etag) {
        res.writeHead(304, { ETag: file.etag, 'Cache-Control': file.headers['Cache-Control'] ?? 'no-cache' });
        res.end();
        return;
      }
      res.writeHead(200, file.headers);
      res.end(req.method === 'HEAD' ? undefined : file.body);
      return;
    }
    if (!this.authorized(req)) {
      res.setHeader('WWW-Authenticate', 'Bearer realm="pgwarden"');
      return send(res, 401, { error: 'missing or invalid bearer token (Authorization: Bearer <admin token>)' });
    }
    if (url.pathname === '/readyz') {
      const ready = await this.options.upstreamReady();
      return send(res, ready ? 200 : 503, { status: ready ? 'ready' : 'upstream unreachable' });
    }
    if (url.pathname === '/metrics' && req.method === 'GET') {
      const text = await this.options.metrics.metrics();
      res.writeHead(200, { 'Content-Type': this.options.metrics.contentType, 'X-Content-Type-Options': 'nosniff' });
      res.end(text);
      return;
    }
    let match: ReturnType<AdminServer['route']>;
    try {
      match = this.route(req.method ?? 'GET', url.pathname);
    } catch (err) {
      if (err instanceof ApiError) return send(res, err.status, { error: err.message });
      throw err;
    }
    if (match === null) return send(res, 404, { error: `no such endpoint: ${req.method} ${url.pathname}` });
    if (match === 'method') return send(res, 405, { error: `${req.method} is not allowed on ${url.pathname}` });
    try {
      const body = req.method === 'POST' ? await readJson(req) : undefined;
      const response = await match.route.handle({ params: match.params, query: url.searchParams, body });
      for (const [name, value] of Object.entries(response.headers ?? {})) res.setHeader(name, value);
      if (response.contentType !== undefined && typeof response.body === 'string') {
        res.writeHead(response.status, { 'Content-Type': response.contentType, 'Cache-Control': 'no-store' });
        res.end(response.body);
        return;
      }
      send(res, response.status, response.body);
    } catch (err) {
      if (err instanceof ApiError) return send(res, err.status, { error: err.message });
      throw err;
    }
  }

  private authorized(req: http.IncomingMessage): boolean {
    const header = req.headers.authorization ?? '';
    const match = /^Bearer\s+(.+)$/i.exec(header);
    if (!match) return false;
    const given = Buffer.from(match[1].trim());
    return given.length === this.token.length && timingSafeEqual(given, this.token);
  }

  private route(method: string, pathname: string): { route: Route; params: Record<string, string> } | 'method' | null {
    const segments = pathname.split('/').filter(Boolean);
    let pathMatched = false;
    for (const route of this.options.routes) {
      const pattern = route.path.split('/').filter(Boolean);
      if (pattern.length !== segments.length) continue;
      const params: Record<string, string> = {};
      const ok = pattern.every((p, i) => {
        if (p.startsWith(':')) {
          try {
            params[p.slice(1)] = decodeURIComponent(segments[i]);
          } catch {
            throw new ApiError(400, `malformed percent-encoding in the URL path segment for :${p.slice(1)}`);
          }
          return true;
        }
        return p === segments[i];
      });
      if (!ok) continue;
      pathMatched = true;
      if (route.method === method) return { route, params };
    }
    return pathMatched ? 'method' : null;
  }
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Cache-Control': 'no-store',
    'X-Content-Type-Options': 'nosniff',
  });
  res.end(text);
}

async function readJson(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new ApiError(413, `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (size === 0) throw new ApiError(400, 'request body must be a JSON object');
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new ApiError(400, `request body is not valid JSON: ${(err as Error).message}`);
  }
}

/** Readiness: can a TCP connection to the upstream be opened (result cached briefly)? */
export function upstreamProbe(host: string, port: number, timeoutMs = 2000): () => Promise<boolean> {
  let cached: { at: number; ok: boolean } | null = null;
  return async () => {
    if (cached && Date.now() - cached.at < 1000) return cached.ok;
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ host, port });
      const done = (result: boolean) => {
        socket.destroy();
        resolve(result);
      };
      socket.setTimeout(timeoutMs, () => done(false));
      socket.once('connect', () => done(true));
      socket.once('error', () => done(false));
    });
    cached = { at: Date.now(), ok };
    return ok;
  };
}
