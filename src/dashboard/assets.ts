// The dashboard's files as the admin server serves them: the hand-written browser
// app in public/ and uPlot's own distribution files, read once at startup, each with
// its content type and headers. They carry no data, so they are served without the
// token; the app sends the token with every API call. Nothing is loaded from the
// internet: the Content-Security-Policy allows this origin only.
//
// public/ sits next to this module: src/dashboard/public when run from source, and
// dist/dashboard/public after `npm run build` (the build script copies it, since tsc
// only emits .ts files).

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface DashboardFile {
  readonly body: Buffer;
  readonly headers: Readonly<Record<string, string>>;
  /** Strong validator for If-None-Match. */
  readonly etag: string;
}

export interface DashboardFiles {
  /** The file served at a URL path ("/", "/assets/app.js"), if any. */
  get(pathname: string): DashboardFile | undefined;
}

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

// uPlot sizes its elements through element.style (CSSOM), which style-src 'self'
// allows; no inline scripts or style attributes exist anywhere in the app.
const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

const PUBLIC_FILES = [
  'index.html',
  'app.js',
  'api.js',
  'dom.js',
  'views.js',
  'chart.js',
  'modal.js',
  'style.css',
  'favicon.svg',
];

/** Where the browser app's files are: next to this module, else in the package's src/ (tsc run without the copy step). */
function publicDir(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const candidates = [path.join(here, 'public'), path.resolve(here, '../../src/dashboard/public')];
  const found = candidates.find((dir) => fs.existsSync(path.join(dir, 'index.html')));
  if (!found)
    throw new Error(
      `dashboard files not found (looked in ${candidates.join(', ')}); run \`npm run build\`, which copies src/dashboard/public`,
    );
  return found;
}

function file(filePath: string, extraHeaders: Record<string, string>): DashboardFile {
  const body = fs.readFileSync(filePath);
  const etag = `"${createHash('sha256').update(body).digest('base64url').slice(0, 22)}"`;
  return {
    body,
    etag,
    headers: {
      'Content-Type': CONTENT_TYPES[path.extname(filePath)] ?? 'application/octet-stream',
      'Content-Length': String(body.length),
      'Content-Security-Policy': CONTENT_SECURITY_POLICY,
      'X-Content-Type-Options': 'nosniff',
      'Referrer-Policy': 'no-referrer',
      ETag: etag,
      ...extraHeaders,
    },
  };
}

/** Reads the dashboard's files; throws with the path when one is missing. */
export function loadDashboard(): DashboardFiles {
  const dir = publicDir();
  const uplot = path.dirname(createRequire(import.meta.url).resolve('uplot/package.json'));
  const files = new Map<string, DashboardFile>();
  // The page itself is never cached: a new pgwarden must not run an old app against its API.
  const index = file(path.join(dir, 'index.html'), { 'Cache-Control': 'no-store' });
  files.set('/', index);
  files.set('/index.html', index);
  const revalidate = { 'Cache-Control': 'no-cache' };
  for (const name of PUBLIC_FILES.filter((n) => n !== 'index.html'))
    files.set(`/assets/${name}`, file(path.join(dir, name), revalidate));
  files.set('/assets/uPlot.iife.min.js', file(path.join(uplot, 'dist/uPlot.iife.min.js'), revalidate));
  files.set('/assets/uPlot.min.css', file(path.join(uplot, 'dist/uPlot.min.css'), revalidate));
  return { get: (pathname) => files.get(pathname) };
}
