// The admin API from the browser: the bearer token (from the URL fragment or the
// login form, kept in this tab's sessionStorage) goes with every call. A fragment
// never reaches the server or its logs, and it is removed from the address bar at
// once so it does not end up in bookmarks or screenshots.

const TOKEN_KEY = 'pgwarden.admin_token';

/** The token was missing or rejected (HTTP 401): the login form should show. */
export class Unauthorized extends Error {}

/** The API answered with an error; `message` is its explanation. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Moves a `#token=...` fragment into sessionStorage and clears it from the URL. */
export function takeTokenFromFragment() {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ''));
  const token = fragment.get('token');
  if (token === null) return;
  if (token.trim() !== '') setToken(token.trim());
  history.replaceState(null, '', location.pathname + location.search);
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Calls the API; resolves to the parsed JSON body, or null for a 404 when `allow404`. */
export async function api(path, { method = 'GET', body, allow404 = false } = {}) {
  const token = getToken();
  if (!token) throw new Unauthorized('no token');
  const headers = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
    credentials: 'omit',
  });
  if (response.status === 401) throw new Unauthorized('token rejected');
  if (response.status === 404 && allow404) return null;
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(response.status, `${method} ${path}: HTTP ${response.status}, not JSON`);
  }
  if (!response.ok) throw new ApiError(response.status, parsed?.error ?? `${method} ${path}: HTTP ${response.status}`);
  return parsed;
}

/** Calls the API for a text body (the Markdown postmortem). */
export async function apiText(path) {
  const token = getToken();
  if (!token) throw new Unauthorized('no token');
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${token}` },
    cache: 'no-store',
    credentials: 'omit',
  });
  if (response.status === 401) throw new Unauthorized('token rejected');
  if (!response.ok) throw new ApiError(response.status, `GET ${path}: HTTP ${response.status}`);
  return response.text();
}
