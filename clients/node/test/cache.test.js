// The client against the real daemon and a private redis-server.

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient, SatchelError } from '../index.js';
import { startStack, eventually } from './harness.js';

let stack;
let client;

before(async () => {
  stack = await startStack();
  client = new SatchelClient({ socket: stack.socket, clientName: 'node-tests' });
});

after(async () => {
  client?.close();
  await stack?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

describe('hand-encoded key requests', () => {
  test('get and fetch find keys of every string-header width, ASCII or not', async () => {
    // 31/32 bytes: fixstr vs str8; 255/256: str8 vs str16 (max_key_bytes is 1024).
    const keys = ['k', 'a'.repeat(31), 'b'.repeat(32), 'c'.repeat(255), 'd'.repeat(256), 'e'.repeat(1024), 'clé-ü-🎓', 'ü'.repeat(16)];
    for (const [i, key] of keys.entries()) {
      await client.cache.set(key, { i, key });
      assert.deepEqual((await client.cache.get(key)).value, { i, key }, `get ${key.length}`);
      assert.deepEqual(await client.cache.getOrSet(key, () => assert.fail('a hit')), { i, key });
      const r = await client.cache.fetch(key);
      assert.equal(r.hit, true);
      assert.equal(typeof r.ttlMs, 'number');
    }
    // Over the daemon's limit: its error, named for the field, as for any request.
    await assert.rejects(client.cache.get('f'.repeat(1025)), (e) => e.code === 'TOO_LARGE' || e.code === 'BAD_REQUEST');
    // Many answers of mixed sizes in flight at once: chunk boundaries fall anywhere,
    // inside length prefixes too, and every answer still reaches its request.
    const sizes = Array.from({ length: 300 }, (_, i) => (i * 7919) % 70000);
    await Promise.all(sizes.map((n, i) => client.cache.set(`mixed:${i}`, 'x'.repeat(n))));
    const got = await Promise.all(sizes.map((_, i) => client.cache.get(`mixed:${i}`)));
    got.forEach((r, i) => assert.equal(r.value.length, sizes[i], `mixed:${i}`));
    // A key that is not a string goes the generic way and gets the daemon's BAD_REQUEST.
    await assert.rejects(client.cache.get(42), (e) => e instanceof SatchelError && e.code === 'BAD_REQUEST');
  });
});

describe('connection', () => {
  test('hello reports the protocol, limits and ops', async () => {
    const hello = await client.connect();
    assert.equal(hello.protocol, 1);
    assert.match(hello.server, /^satchel\//);
    assert.ok(hello.ops.includes('cache.fetch'));
    assert.equal(typeof hello.maxFrame, 'number');
    assert.equal(await client.ping(), 'pong');
  });

  test('pipelined requests are matched by id even when answered out of order', async () => {
    const order = [];
    const slow = client.ping(200).then(() => order.push('slow'));
    const fast = client.ping().then(() => order.push('fast'));
    await Promise.all([slow, fast]);
    assert.deepEqual(order, ['fast', 'slow']);
  });

  test('an unreachable socket rejects with UNREACHABLE', async () => {
    const c = new SatchelClient({ socket: `${stack.dir}/nobody-here.sock` });
    await assert.rejects(c.ping(), (e) => e instanceof SatchelError && e.code === 'UNREACHABLE');
    c.close();
  });
});

describe('values', () => {
  test('set/get round-trips MessagePack types', async () => {
    const value = {
      s: 'text ✓',
      n: 42,
      neg: -7,
      f: 1.5,
      big: 2n ** 62n,
      bin: new Uint8Array([0, 1, 2, 255]),
      list: [1, 'two', null, true],
      nested: { a: { b: [] } },
    };
    assert.equal(await client.cache.set('types', value, { ttlMs: 60000 }), true);
    const got = await client.cache.get('types');
    assert.equal(got.hit, true);
    assert.ok(got.ttlMs > 0 && got.ttlMs <= 60000);
    assert.deepEqual({ ...got.value, bin: new Uint8Array(got.value.bin) }, value);
    assert.ok(Buffer.isBuffer(got.value.bin), 'bin decodes as a Buffer');
    assert.equal(typeof got.value.big, 'bigint');
  });

  test('a Buffer is stored as bin and comes back as bytes', async () => {
    await client.cache.set('buf', Buffer.from('hello'));
    const got = await client.cache.get('buf');
    assert.equal(Buffer.from(got.value).toString(), 'hello');
  });

  test('a miss is {hit: false}', async () => {
    assert.deepEqual(await client.cache.get('never-set'), { hit: false });
  });

  test('mget answers per key in order, del counts existing keys', async () => {
    await client.cache.set('m1', 'one');
    await client.cache.set('m2', 'two');
    const r = await client.cache.mget(['m1', 'missing', 'm2', 'm1']);
    assert.deepEqual(
      r.map((x) => (x.hit ? x.value : null)),
      ['one', null, 'two', 'one'],
    );
    assert.equal(await client.cache.del(['m1', 'm2', 'missing']), 2);
    assert.equal(await client.cache.del('m1'), 0);
  });

  test('entries expire after ttlMs', async () => {
    await client.cache.set('short', 1, { ttlMs: 50 });
    await eventually('the entry to expire', async () => !(await client.cache.get('short')).hit, 3000);
  });
});

describe('errors', () => {
  test('BAD_REQUEST names the field', async () => {
    await assert.rejects(client.cache.set('k', 1, { ttlMs: 0 }), (e) => {
      assert.ok(e instanceof SatchelError);
      assert.equal(e.code, 'BAD_REQUEST');
      assert.equal(e.field, 'ttl_ms');
      return true;
    });
    await assert.rejects(client.cache.get(''), (e) => e.code === 'BAD_REQUEST' && e.field === 'key');
  });

  test('UNKNOWN_OP names op', async () => {
    await assert.rejects(client.request('nope.nothing'), (e) => e.code === 'UNKNOWN_OP' && e.field === 'op');
  });

  test('TOO_LARGE for a value over the limit keeps the connection usable', async () => {
    const big = new Uint8Array(2 * 1024 * 1024);
    await assert.rejects(client.cache.set('big', big), (e) => e.code === 'TOO_LARGE' && e.field === 'value');
    assert.equal(await client.ping(), 'pong');
  });

  test('a frame over max_frame is refused client-side with TOO_LARGE, connection unharmed', async () => {
    const inFlight = client.ping(100);
    const huge = new Uint8Array(9 * 1024 * 1024);
    await assert.rejects(client.cache.set('huge', huge), (e) => e.code === 'TOO_LARGE');
    assert.equal(await inFlight, 'pong');
  });
});

describe('getOrSet', () => {
  test('1,000 concurrent calls on one key run the loader exactly once', async () => {
    let loads = 0;
    const loader = async () => {
      loads += 1;
      await sleep(50);
      return { exam: 'final', seats: 1000 };
    };
    const results = await Promise.all(
      Array.from({ length: 1000 }, () => client.cache.getOrSet('herd', loader, { ttlMs: 60000, tags: ['herd'] })),
    );
    assert.equal(loads, 1);
    assert.equal(results.length, 1000);
    for (const r of results) assert.deepEqual(r, { exam: 'final', seats: 1000 });
    assert.deepEqual((await client.cache.get('herd')).value, { exam: 'final', seats: 1000 });
  });

  test('a hit does not call the loader', async () => {
    await client.cache.set('cached', 'from cache');
    const v = await client.cache.getOrSet('cached', () => assert.fail('loader called on a hit'));
    assert.equal(v, 'from cache');
  });

  test('a throwing loader rejects, fills nothing, and its lease expires for the next caller', async () => {
    await assert.rejects(
      client.cache.getOrSet('flaky', async () => {
        throw new Error('db down');
      }, { leaseMs: 100 }),
      /db down/,
    );
    assert.equal((await client.cache.get('flaky')).hit, false);
    const v = await client.cache.getOrSet('flaky', async () => 'recovered', { leaseMs: 100 });
    assert.equal(v, 'recovered');
    assert.equal((await client.cache.get('flaky')).value, 'recovered');
  });

  test('without a lease (holder too slow) the loader runs and nothing is filled by the waiter', async () => {
    let loads = 0;
    const slowHolder = client.cache.getOrSet('slow', async () => {
      loads += 1;
      await sleep(800); // far longer than the waiter's steps, even on a loaded machine
      return 'holder';
    });
    await sleep(50);
    const waiter = await client.cache.getOrSet('slow', async () => {
      loads += 1;
      return 'waiter';
    }, { waitMs: 20 });
    assert.equal(waiter, 'waiter');
    assert.equal((await client.cache.get('slow')).hit, false, 'the waiter must not fill');
    assert.equal(await slowHolder, 'holder');
    assert.equal((await client.cache.get('slow')).value, 'holder');
    assert.equal(loads, 2);
  });

  test('fetch/fill expose the lease protocol directly', async () => {
    const r = await client.cache.fetch('manual', { leaseMs: 5000 });
    assert.equal(r.hit, false);
    assert.equal(typeof r.lease, 'string');
    assert.equal(await client.cache.fill('manual', r.lease, 'v', { tags: ['t-manual'] }), true);
    const hit = await client.cache.fetch('manual');
    assert.deepEqual({ hit: hit.hit, value: hit.value }, { hit: true, value: 'v' });
    assert.ok(hit.ttlMs > 0 && hit.ttlMs <= 3_600_000, `ttlMs ${hit.ttlMs}`);
    assert.equal(await client.cache.fill('manual', r.lease, 'again'), false);
  });
});

describe('invalidation', () => {
  test('tags remove every entry carrying them', async () => {
    await client.cache.set('exam:1', 'a', { tags: ['exams', 'exam:1'] });
    await client.cache.set('exam:2', 'b', { tags: ['exams', 'exam:2'] });
    await client.cache.set('other', 'c', { tags: ['other'] });
    assert.equal(await client.cache.invalidate({ tags: ['exam:1'] }), 1);
    assert.equal((await client.cache.get('exam:1')).hit, false);
    assert.equal((await client.cache.get('exam:2')).hit, true);
    assert.equal(await client.cache.invalidate({ tags: ['exams'] }), 1);
    assert.equal((await client.cache.get('exam:2')).hit, false);
    assert.equal((await client.cache.get('other')).hit, true);
  });

  test('a prefix is literal and removes matching keys only', async () => {
    await client.cache.set('user:1:profile', 1);
    await client.cache.set('user:1:prefs', 2);
    await client.cache.set('user:10:profile', 3);
    await client.cache.set('user:*', 4);
    assert.equal(await client.cache.invalidate({ prefix: 'user:1:' }), 2);
    assert.equal((await client.cache.get('user:10:profile')).hit, true);
    assert.equal((await client.cache.get('user:*')).hit, true);
  });

  test('invalidating a tag while a loader runs keeps the stale value out of the cache', async () => {
    const v = await client.cache.getOrSet('racy', async () => {
      await client.cache.invalidate({ tags: ['racy-tag'] });
      return 'stale';
    }, { tags: ['racy-tag'] });
    assert.equal(v, 'stale');
    assert.equal((await client.cache.get('racy')).hit, false);
  });
});

describe('reconnect', () => {
  test('in-flight requests reject with DISCONNECTED when the daemon dies; the next call reconnects', async () => {
    assert.equal(await client.ping(), 'pong');
    const inFlight = client.ping(5000);
    inFlight.catch(() => {}); // asserted below, after the kill
    await sleep(50);
    await stack.daemon.stop('SIGKILL');
    await assert.rejects(inFlight, (e) => e instanceof SatchelError && e.code === 'DISCONNECTED');
    await assert.rejects(client.ping(), (e) => e.code === 'UNREACHABLE');
    await stack.daemon.start();
    assert.equal(await client.ping(), 'pong');
    await client.cache.set('after-restart', 'ok');
    assert.equal((await client.cache.get('after-restart')).value, 'ok');
  });

  test('a graceful restart (SIGTERM) answers in-flight requests, then the client reconnects', async () => {
    const inFlight = client.ping(100);
    await sleep(20);
    const stopped = stack.daemon.stop('SIGTERM');
    assert.equal(await inFlight, 'pong');
    await stopped;
    await stack.daemon.start();
    assert.equal(await client.ping(), 'pong');
  });
});

describe('redis outage', () => {
  test('cache ops answer UNAVAILABLE with retryAfterMs; getOrSet falls back to the loader', async () => {
    await stack.redis.stop();
    await assert.rejects(client.cache.get('x'), (e) => e.code === 'UNAVAILABLE' && e.retryAfterMs > 0);
    assert.equal(await client.cache.getOrSet('x', async () => 'from db'), 'from db');
    await assert.rejects(client.cache.getOrSet('x', async () => 'from db', { strict: true }), (e) => e.code === 'UNAVAILABLE');
  });
});
