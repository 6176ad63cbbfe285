// The in-process cache (`localCache`) against real daemons and a private redis-server.

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Packr } from 'msgpackr';
import { SatchelClient, LocalCache } from '../index.js';
import { startStack, eventually, Daemon } from './harness.js';

let stack;
let other; // a second daemon on the same Redis
let local; // a client with a local cache, on the first daemon
let plain; // a client without, on the first daemon
let remote; // a client on the second daemon

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function trackingLive(client) {
  await eventually('the daemon tracks Redis', async () => (await client.stats()).cache.near.tracking === true);
}

before(async () => {
  stack = await startStack();
  other = await new Daemon(path.join(stack.dir, 'other.sock'), stack.redis.url).start();
  plain = new SatchelClient({ socket: stack.socket });
  remote = new SatchelClient({ socket: other.socket });
  await trackingLive(plain);
  local = new SatchelClient({ socket: stack.socket, localCache: { maxBytes: 1 << 20 } });
});

after(async () => {
  for (const c of [local, plain, remote]) c?.close();
  await other?.stop('SIGKILL');
  await stack?.stop();
});

describe('local cache', () => {
  test('a local hit makes no request and honours the value as stored', async () => {
    await plain.cache.set('lc:a', { n: 1, list: [1, 2] }, { ttlMs: 60_000 });
    assert.deepEqual((await local.cache.get('lc:a')).value, { n: 1, list: [1, 2] });
    const before = (await plain.stats()).requests;
    const hit = await local.cache.get('lc:a');
    const got = await local.cache.getOrSet('lc:a', () => assert.fail('loader ran'));
    const after = (await plain.stats()).requests;
    assert.equal(after - before, 1, 'only the stats request reached the daemon');
    assert.deepEqual(hit.value, { n: 1, list: [1, 2] });
    assert.ok(hit.ttlMs > 0 && hit.ttlMs <= 60_000);
    // Decoded per hit: a caller's change does not leak into the next hit.
    got.n = 99;
    assert.equal((await local.cache.get('lc:a')).value.n, 1);
    const s = local.cache.localStats();
    assert.ok(s.hits >= 3 && s.entries >= 1 && s.bytes > 0, JSON.stringify(s));
  });

  test('a write through another daemon reaches the local cache within 500 ms', async () => {
    await remote.cache.set('lc:b', 'old');
    assert.equal((await local.cache.get('lc:b')).value, 'old');
    assert.equal((await local.cache.get('lc:b')).value, 'old');
    const started = performance.now();
    await remote.cache.set('lc:b', 'new');
    let seen;
    while (performance.now() - started < 500) {
      seen = (await local.cache.get('lc:b')).value;
      if (seen === 'new') break;
      await sleep(1);
    }
    assert.equal(seen, 'new');
    assert.ok(local.cache.localStats().invalidations >= 1);
  });

  test('writes through the same client are read back at once; mget mixes local and remote', async () => {
    await local.cache.set('lc:c', 1);
    await local.cache.get('lc:c');
    await local.cache.set('lc:c', 2);
    assert.equal((await local.cache.get('lc:c')).value, 2);
    await local.cache.del('lc:c');
    assert.equal((await local.cache.get('lc:c')).hit, false);
    await plain.cache.set('lc:m1', 'one', { tags: ['lc-t'] });
    await plain.cache.set('lc:m2', 'two');
    await local.cache.get('lc:m1');
    const r = await local.cache.mget(['lc:m1', 'lc:missing', 'lc:m2', 'lc:m1']);
    assert.deepEqual(r.map((x) => (x.hit ? x.value : null)), ['one', null, 'two', 'one']);
    await local.cache.invalidate({ tags: ['lc-t'] });
    assert.equal((await local.cache.get('lc:m1')).hit, false);
  });

  test('a dropped connection empties the local cache', async () => {
    await plain.cache.set('lc:d', 'v');
    await local.cache.get('lc:d');
    await local.cache.get('lc:d');
    assert.ok(local.cache.localStats().entries > 0);
    local.conn.socket.destroy();
    await eventually('the local cache to be emptied', () => local.cache.localStats().entries === 0);
    await plain.cache.set('lc:d', 'changed while disconnected');
    assert.equal((await local.cache.get('lc:d')).value, 'changed while disconnected');
  });

  test('a value read while its invalidation was in flight is not kept', async () => {
    // The local client's fetch waits for a lease holder's fill: its read is in flight.
    const holder = await plain.cache.fetch('lc:race', { leaseMs: 10_000 });
    assert.ok(holder.lease);
    const waits = (await plain.stats()).cache.leaseWaits;
    const waiting = local.cache.fetch('lc:race', { waitMs: 10_000 });
    await eventually('the fetch to wait', async () => (await plain.stats()).cache.leaseWaits > waits);
    // Another daemon writes the key: the invalidation reaches the local client before
    // the answer (which needs one more Redis round trip), so it must not be kept.
    const { invalidations } = local.cache.localStats();
    await remote.cache.set('lc:race', 'written elsewhere');
    assert.equal((await waiting).value, 'written elsewhere');
    // Whichever came first, once the invalidation is in nothing may be kept for the key.
    await eventually('the invalidation', () => local.cache.localStats().invalidations > invalidations);
    const { misses } = local.cache.localStats();
    assert.equal((await local.cache.get('lc:race')).value, 'written elsewhere');
    assert.equal(local.cache.localStats().misses, misses + 1, 'the answer was kept although its invalidation came first');
  });

  test('under load no read returns a version older than the bound after its write was acknowledged', async () => {
    const KEYS = 4;
    const BOUND_MS = 500;
    const acked = Array.from({ length: KEYS }, () => []); // [version, ackedAt]
    for (let i = 0; i < KEYS; i++) await remote.cache.set(`lc:v${i}`, 0);
    let stop = false;
    let versions = 0;
    const writer = (async () => {
      let v = 0;
      while (!stop) {
        v += 1;
        const i = v % KEYS;
        await remote.cache.set(`lc:v${i}`, v);
        acked[i].push([v, performance.now()]);
        versions = v;
        await sleep(2);
      }
    })();
    let reads = 0;
    let worst = 0;
    const reader = async (r) => {
      let n = r;
      while (!stop) {
        n += 1;
        const i = n % KEYS;
        const begun = performance.now();
        const seen = (await local.cache.get(`lc:v${i}`)).value;
        reads += 1;
        const newest = acked[i].filter(([, at]) => at < begun).pop();
        if (newest && seen < newest[0]) {
          const lag = begun - newest[1];
          worst = Math.max(worst, lag);
          assert.ok(lag <= BOUND_MS, `a read ${lag} ms after v${newest[0]} was acknowledged saw v${seen}`);
        }
        if (n % 50 === 0) await sleep(0);
      }
    };
    const hitsBefore = local.cache.localStats().hits;
    const readers = [0, 1, 2, 3].map(reader);
    await sleep(2000);
    stop = true;
    await Promise.all([writer, ...readers]);
    const hits = local.cache.localStats().hits - hitsBefore;
    console.log(`${versions} versions, ${reads} reads (${hits} local hits), worst lag behind an acknowledged write ${worst.toFixed(2)} ms`);
    assert.ok(versions > 100 && reads > 1000, 'too little load to mean anything');
    assert.ok(hits > reads / 4, 'the readers were not served locally');
  });
});

describe('LocalCache (the pending-read rule)', () => {
  const codec = new Packr({ useRecords: false });

  test('an invalidation or flush during a read means its answer is not kept', () => {
    const c = new LocalCache(1 << 20, codec);
    c.live = true;
    let e = c.begin('k');
    c.onPush({ push: 'invalidate', keys: ['k'] });
    c.finish('k', e, true, 'old', 60_000);
    assert.equal(c.get('k'), undefined);
    e = c.begin('k');
    c.onPush({ push: 'flush' });
    c.finish('k', e, true, 'old', 60_000);
    assert.equal(c.get('k'), undefined);
    e = c.begin('k');
    c.finish('k', e, true, 'fresh', 60_000);
    assert.equal(c.get('k').value, 'fresh');
  });

  test('bounded by bytes, least recently used first', () => {
    const c = new LocalCache(4096, codec);
    c.live = true;
    for (let i = 0; i < 100; i++) c.finish(`k${i}`, c.begin(`k${i}`), true, 'x'.repeat(100), 60_000);
    assert.ok(c.bytes <= 4096 && c.entries.size > 0 && c.entries.size < 100);
    assert.equal(c.get('k0'), undefined);
    assert.equal(c.get('k99').value, 'x'.repeat(100));
  });
});
