// Sample values for a shape's normalized text: the Bind parameters, then the
// literals the normalization replaced, numbered as it numbered them.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { parameterCount, sampleValues } from '../../src/workload/values.ts';

describe('sampleValues', () => {
  before(() => loadParser());

  test('a prepared statement without literals: its parameters', () => {
    assert.deepEqual(sampleValues('select * from users where email = $1 and id = $2', ['a@example.com', null]), [
      'a@example.com',
      null,
    ]);
  });

  test("a simple Query's literals, decoded, in the normalization's order", () => {
    assert.deepEqual(
      sampleValues(
        "select 'é' from t where a = -5 - 3 and c = 'it''s' and d = E'a\\nb' and e = 0 and f = false and g = '' and h in (1.5, 2)",
        [],
      ),
      ['é', '-5', '3', "it's", 'a\nb', '0', 'false', '', '1.5', '2'],
    );
  });

  test('literals of a prepared statement come after its own parameters', () => {
    assert.deepEqual(sampleValues("select * from t where a = $1 and b = 'x' limit 10", ['7']), ['7', 'x', '10']);
  });

  test('text that is not one parseable statement gives no sample', () => {
    assert.equal(sampleValues('select 1; select 2', []), null);
    assert.equal(sampleValues('selec 1', []), null);
    assert.equal(sampleValues('select * from t where a = $2', ['only one']), null);
  });

  test('parameterCount is the highest $n', () => {
    assert.equal(parameterCount('select $1, $3'), 3);
    assert.equal(parameterCount('select 1'), 0);
  });
});
