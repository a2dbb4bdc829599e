import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  CONTINUE,
  Framer,
  HEADER,
  HOLD,
  kindTable,
  PASS,
  SKIP,
  WHOLE,
  type FrameHandler,
  type KindTable,
  type MessageKind,
  type Outcome,
} from '../../src/protocol/framer.ts';

function message(type: string, body: Buffer | string): Buffer {
  const payload = typeof body === 'string' ? Buffer.from(body) : body;
  const out = Buffer.alloc(5 + payload.length);
  out[0] = type.charCodeAt(0);
  out.writeInt32BE(4 + payload.length, 1);
  payload.copy(out, 5);
  return out;
}

const kinds = kindTable(PASS, [['Q'.charCodeAt(0)], WHOLE], [['D'.charCodeAt(0)], HEADER]);

class Recorder implements FrameHandler {
  forwarded: Buffer[] = [];
  seen: string[] = [];
  violations: string[] = [];
  decide: (type: string, body: string) => Outcome = () => CONTINUE;
  constructor(public framer?: Framer) {}
  onMessage(type: number, buf: Buffer, start: number, end: number): Outcome {
    const t = String.fromCharCode(type);
    if (t === 'Q') {
      const body = buf.toString('utf8', start + 5, end);
      this.seen.push(`Q:${body}`);
      const outcome = this.decide(t, body);
      if (outcome === SKIP) {
        this.framer!.flushPending();
        this.forwarded.push(Buffer.from(`<replaced ${body}>`));
      }
      return outcome;
    }
    this.seen.push(`${t}:${end - start}`);
    return CONTINUE;
  }
  onForward(bytes: Buffer): void {
    this.forwarded.push(Buffer.from(bytes));
  }
  onViolation(reason: string): void {
    this.violations.push(reason);
  }
  output(): string {
    return Buffer.concat(this.forwarded).toString('latin1');
  }
}

function frame(stream: Buffer, splits: number[], setup?: (r: Recorder) => void): Recorder {
  const recorder = new Recorder();
  const framer = new Framer(kinds, 1 << 20, recorder);
  recorder.framer = framer;
  setup?.(recorder);
  let last = 0;
  for (const at of [...splits, stream.length]) {
    framer.push(stream.subarray(last, at));
    last = at;
  }
  return recorder;
}

const stream = Buffer.concat([
  message('Q', 'select 1'),
  message('D', Buffer.alloc(300, 7)),
  message('X', ''),
  message('Q', 'select 2'),
  message('C', 'SELECT 1\0'),
]);

describe('Framer', () => {
  test('forwards a stream byte for byte and shows the same messages however reads split it', () => {
    const whole = frame(stream, []);
    assert.equal(whole.output(), stream.toString('latin1'));
    assert.deepEqual(whole.seen, ['Q:select 1', 'D:305', 'Q:select 2']);
    for (let a = 1; a < stream.length; a++) {
      for (const b of [a + 1, a + 3, a + 17]) {
        if (b >= stream.length) continue;
        const split = frame(stream, [a, b]);
        assert.equal(split.output(), stream.toString('latin1'), `splits at ${a},${b}`);
        assert.deepEqual(split.seen, whole.seen, `splits at ${a},${b}`);
      }
    }
  });

  test('forwards the original chunk itself when nothing in it is replaced', () => {
    const recorder = new Recorder();
    const framer = new Framer(kinds, 1 << 20, recorder);
    recorder.onForward = function (bytes) {
      this.forwarded.push(bytes);
    };
    framer.push(stream);
    assert.equal(recorder.forwarded.length, 1);
    assert.equal(recorder.forwarded[0], stream);
  });

  test('a skipped message is replaced in place, keeping the order of everything around it', () => {
    for (let at = 1; at < stream.length; at += 3) {
      const r = frame(stream, [at], (rec) => {
        rec.decide = (_t, body) => (body === 'select 2' ? SKIP : CONTINUE);
      });
      const expected = Buffer.concat([
        message('Q', 'select 1'),
        message('D', Buffer.alloc(300, 7)),
        message('X', ''),
        Buffer.from('<replaced select 2>'),
        message('C', 'SELECT 1\0'),
      ]);
      assert.equal(r.output(), expected.toString('latin1'), `split at ${at}`);
    }
  });

  test('a held message stops framing until resume, and input meanwhile keeps its order', () => {
    const recorder = new Recorder();
    const framer = new Framer(kinds, 1 << 20, recorder);
    recorder.framer = framer;
    recorder.decide = (_t, body) => (body === 'select 1' && recorder.seen.length === 1 ? HOLD : CONTINUE);
    framer.push(stream.subarray(0, 20));
    assert.equal(framer.holding, true);
    assert.equal(recorder.output(), '');
    framer.push(stream.subarray(20));
    assert.deepEqual(recorder.seen, ['Q:select 1']);
    // The handler forwards the held message itself, then resumes.
    recorder.forwarded.push(message('Q', 'select 1'));
    framer.resume();
    assert.equal(framer.holding, false);
    assert.equal(recorder.output(), stream.toString('latin1'));
  });

  test('a length below 4 is a violation and stops framing', () => {
    const bad = Buffer.concat([message('Q', 'select 1'), Buffer.from([0x51, 0, 0, 0, 2]), message('Q', 'select 3')]);
    const r = frame(bad, []);
    assert.deepEqual(r.violations, ['invalid message length 2']);
    assert.deepEqual(r.seen, ['Q:select 1']);
    assert.equal(r.output(), message('Q', 'select 1').toString('latin1'));
  });

  test('a length above the limit is a violation, even when only its header has arrived', () => {
    const recorder = new Recorder();
    const framer = new Framer(kinds, 1000, recorder);
    const header = Buffer.from([0x64, 0, 0, 0x10, 0]);
    framer.push(header.subarray(0, 3));
    framer.push(header.subarray(3));
    assert.equal(recorder.violations.length, 1);
    assert.match(recorder.violations[0], /exceeds the limit of 1000/);
  });

  test('a large pass-through message streams without being gathered', () => {
    const big = message('d', Buffer.alloc(200_000, 1));
    const recorder = new Recorder();
    const framer = new Framer(kinds, 1 << 20, recorder);
    recorder.onForward = function (bytes) {
      this.forwarded.push(bytes);
    };
    framer.push(big.subarray(0, 65536));
    framer.push(big.subarray(65536));
    assert.equal(recorder.forwarded.length, 2);
    assert.equal(recorder.forwarded[0].buffer, big.buffer, 'first read forwarded in place');
  });

  test('a handler that stops the framer ends the read there: nothing after that message is seen or forwarded', () => {
    for (let split = 1; split < stream.length; split += 7) {
      for (const splits of [[], [split]]) {
        const recorder = frame(stream, splits, (r) => {
          r.decide = (_type, body) => {
            if (body === 'select 1') {
              r.framer!.stop();
              return SKIP;
            }
            return CONTINUE;
          };
        });
        assert.deepEqual(recorder.seen, ['Q:select 1'], `splits ${splits.join(',')}`);
        assert.equal(recorder.output(), '<replaced select 1>', `splits ${splits.join(',')}`);
      }
    }
  });
});

describe('kinds and outcomes', () => {
  // The @ts-expect-error lines are the test: `npx tsc --noEmit -p .` fails if any of
  // them type-checks, i.e. if kinds, outcomes and plain numbers could be mixed.
  test('are distinct types at compile time and plain numbers at run time', () => {
    // @ts-expect-error a MessageKind is not an Outcome
    const outcome: Outcome = WHOLE;
    // @ts-expect-error an Outcome is not a MessageKind
    const kind: MessageKind = SKIP;
    // @ts-expect-error a plain number is neither
    const plain: Outcome = 1;
    // @ts-expect-error a kind table is built with kindTable(), not from any Uint8Array
    const table: KindTable = new Uint8Array(256);
    assert.deepEqual([outcome, kind, plain, table.length], [1, 1, 1, 256]);
    assert.deepEqual([PASS, WHOLE, HEADER, CONTINUE, SKIP, HOLD], [0, 1, 2, 0, 1, 2]);
  });
});
