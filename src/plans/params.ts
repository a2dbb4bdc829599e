// A sampled execution's parameter values, as text EXPLAIN can take. The plan
// worth seeing is the one the planner chose for *those* values (a skewed value
// can turn an Index Scan into a Seq Scan), and the monitoring connection sends
// parameters as text, so binary values from drivers that use the binary format
// are rendered in PostgreSQL's text input syntax. Types we cannot render make
// the whole set unusable (null): a half-right parameter list is a wrong plan.

import { decodeBindParameters } from '../protocol/frontend.ts';

const TEXT_FORMAT = 0;
const BINARY_FORMAT = 1;

/** Days and microseconds between the Unix epoch and PostgreSQL's (2000-01-01). */
const POSTGRES_EPOCH_JDATE = 2_451_545;
const USECS_PER_DAY = 86_400_000_000n;
const INT64_MAX = 0x7fff_ffff_ffff_ffffn;
const INT64_MIN = -0x8000_0000_0000_0000n;
const INT32_MAX = 0x7fff_ffff;
const INT32_MIN = -0x8000_0000;

type Decoder = (value: Buffer) => string | null;

const utf8: Decoder = (v) => v.toString('utf8');

const DECODERS = new Map<number, Decoder>([
  [16, (v) => (v.length === 1 ? (v[0] !== 0 ? 'true' : 'false') : null)], // bool
  [17, (v) => `\\x${v.toString('hex')}`], // bytea
  [19, utf8], // name
  [20, (v) => (v.length === 8 ? v.readBigInt64BE(0).toString() : null)], // int8
  [21, (v) => (v.length === 2 ? String(v.readInt16BE(0)) : null)], // int2
  [23, (v) => (v.length === 4 ? String(v.readInt32BE(0)) : null)], // int4
  [25, utf8], // text
  [26, (v) => (v.length === 4 ? String(v.readUInt32BE(0)) : null)], // oid
  [114, utf8], // json
  [700, (v) => (v.length === 4 ? float4Text(v.readFloatBE(0)) : null)], // float4
  [701, (v) => (v.length === 8 ? float8Text(v.readDoubleBE(0)) : null)], // float8
  [1042, utf8], // bpchar
  [1043, utf8], // varchar
  [1082, (v) => (v.length === 4 ? dateText(v.readInt32BE(0)) : null)], // date
  [1114, (v) => (v.length === 8 ? timestampText(v.readBigInt64BE(0), '') : null)], // timestamp
  [1184, (v) => (v.length === 8 ? timestampText(v.readBigInt64BE(0), 'Z') : null)], // timestamptz
  [1700, numericText], // numeric
  [2950, (v) => (v.length === 16 ? uuidText(v) : null)], // uuid
  [3802, (v) => (v.length >= 1 && v[0] === 1 ? v.toString('utf8', 1) : null)], // jsonb: version 1, then text
]);

/**
 * The Bind message's parameters as text (null for SQL NULL), or null when some
 * binary value has an undeclared (0) or unsupported type, or is malformed (the
 * server would have refused that Bind anyway). `paramTypes` are the OIDs the
 * client declared in Parse; missing entries count as 0. Throws ProtocolError
 * on a truncated Bind message.
 */
export function parametersAsText(bind: Buffer, paramTypes: readonly number[]): (string | null)[] | null {
  const { formats, values } = decodeBindParameters(bind);
  const out = new Array<string | null>(values.length);
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (value === null) {
      out[i] = null;
    } else if (formats[i] === TEXT_FORMAT) {
      out[i] = value.toString('utf8');
    } else if (formats[i] === BINARY_FORMAT) {
      const decoder = DECODERS.get(paramTypes[i] ?? 0);
      const text = decoder === undefined ? null : decoder(value);
      if (text === null) return null;
      out[i] = text;
    } else {
      return null;
    }
  }
  return out;
}

function float8Text(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return 'Infinity';
  if (value === -Infinity) return '-Infinity';
  // JavaScript's shortest round-trip form is exactly what float8 input needs
  // ("1e+21" included); -0 keeps its sign as PostgreSQL does.
  return Object.is(value, -0) ? '-0' : String(value);
}

/** The shortest decimal that reads back as the same float4 (0.1, not 0.10000000149011612). */
function float4Text(value: number): string {
  if (!Number.isFinite(value) || value === 0) return float8Text(value);
  for (let digits = 1; digits < 17; digits++) {
    const text = value.toPrecision(digits);
    if (Math.fround(Number(text)) === value) return String(Number(text));
  }
  return String(value);
}

function dateText(days: number): string {
  if (days === INT32_MAX) return 'infinity';
  if (days === INT32_MIN) return '-infinity';
  return julianDateText(days + POSTGRES_EPOCH_JDATE);
}

function timestampText(usecs: bigint, zone: string): string {
  if (usecs === INT64_MAX) return 'infinity';
  if (usecs === INT64_MIN) return '-infinity';
  let days = usecs / USECS_PER_DAY;
  let time = usecs % USECS_PER_DAY;
  if (time < 0n) {
    time += USECS_PER_DAY;
    days -= 1n;
  }
  const t = Number(time);
  const micros = t % 1_000_000;
  const seconds = Math.floor(t / 1_000_000);
  const clock = `${pad(Math.floor(seconds / 3600), 2)}:${pad(Math.floor(seconds / 60) % 60, 2)}:${pad(seconds % 60, 2)}`;
  const fraction = micros === 0 ? '' : `.${pad(micros, 6).replace(/0+$/, '')}`;
  const date = julianDateText(Number(days) + POSTGRES_EPOCH_JDATE);
  // Era goes last ("0044-03-15T12:00:00Z BC"), where PostgreSQL's input expects it.
  const bc = date.endsWith(' BC');
  return `${bc ? date.slice(0, -3) : date}T${clock}${fraction}${zone}${bc ? ' BC' : ''}`;
}

/** j2date() from PostgreSQL's datetime.c, formatted as "YYYY-MM-DD" (or "... BC"). */
function julianDateText(jd: number): string {
  let julian = jd + 32044;
  let quad = Math.floor(julian / 146097);
  const extra = (julian - quad * 146097) * 4 + 3;
  julian += 60 + quad * 3 + Math.floor(extra / 146097);
  quad = Math.floor(julian / 1461);
  julian -= quad * 1461;
  let y = Math.floor((julian * 4) / 1461);
  julian = (y !== 0 ? (julian + 305) % 365 : (julian + 306) % 366) + 123;
  y += quad * 4;
  const year = y - 4800;
  quad = Math.floor((julian * 2141) / 65536);
  const day = julian - Math.floor((7834 * quad) / 256);
  const month = ((quad + 10) % 12) + 1;
  const md = `-${pad(month, 2)}-${pad(day, 2)}`;
  // There is no year 0: year 0 is 1 BC.
  return year > 0 ? `${pad(year, 4)}${md}` : `${pad(1 - year, 4)}${md} BC`;
}

function uuidText(v: Buffer): string {
  const hex = v.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const NUMERIC_POS = 0x0000;
const NUMERIC_NEG = 0x4000;
const NUMERIC_NAN = 0xc000;
const NUMERIC_PINF = 0xd000;
const NUMERIC_NINF = 0xf000;

/**
 * numeric_send()'s format: ndigits, weight, sign, dscale (int16 each), then
 * ndigits base-10000 digits; the value is sum(digit[i] * 10000^(weight - i)),
 * shown with exactly dscale decimals (as get_str_from_var() does).
 */
function numericText(v: Buffer): string | null {
  if (v.length < 8) return null;
  const ndigits = v.readInt16BE(0);
  const weight = v.readInt16BE(2);
  const sign = v.readUInt16BE(4);
  const dscale = v.readInt16BE(6);
  if (ndigits < 0 || dscale < 0 || v.length !== 8 + ndigits * 2) return null;
  if (sign === NUMERIC_NAN) return 'NaN';
  if (sign === NUMERIC_PINF) return 'Infinity';
  if (sign === NUMERIC_NINF) return '-Infinity';
  if (sign !== NUMERIC_POS && sign !== NUMERIC_NEG) return null;
  const digits: number[] = [];
  for (let i = 0; i < ndigits; i++) {
    const digit = v.readInt16BE(8 + i * 2);
    if (digit < 0 || digit > 9999) return null;
    digits.push(digit);
  }
  const digitAt = (i: number): number => (i >= 0 && i < ndigits ? digits[i] : 0);

  let integer = '';
  if (weight < 0) {
    integer = '0';
  } else {
    for (let i = 0; i <= weight; i++) integer += i === 0 ? String(digitAt(0)) : pad(digitAt(i), 4);
  }
  let fraction = '';
  // Digit i sits at 10000^(weight - i): the first fractional group is i = weight + 1.
  for (let i = weight + 1; fraction.length < dscale; i++) fraction += pad(digitAt(i), 4);
  fraction = fraction.slice(0, dscale);
  const text = dscale > 0 ? `${integer}.${fraction}` : integer;
  return sign === NUMERIC_NEG ? `-${text}` : text;
}

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}
