// Client-side flow control against the real daemon, with max_inflight_per_conn = 4 so
// the bound is easy to fill: slow pings (`delay_ms`) hold the wire.

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient, SatchelError } from '../index.js';
import { startStack, eventually } from './harness.js';

const MAX_INFLIGHT = 4;
let stack;

before(async () => {
  stack = await startStack({ SATCHEL_SERVER_MAX_INFLIGHT_PER_CONN: String(MAX_INFLIGHT) });
});

after(async () => {
  await stack?.stop();
});

/** Runs `fn` with a connected client made with `opts`, and closes it after. */
async function withClient(opts, fn) {
  const client = new SatchelClient({ socket: stack.socket, ...opts });
  try {
    await fn(client, await client.connect());
  } finally {
    client.close();
  }
}

/** Fills the wire with MAX_INFLIGHT pings that each take `ms`. */
function holdWire(client, ms) {
  return Array.from({ length: MAX_INFLIGHT }, () => client.ping(ms));
}

describe('flow control', () => {
  test('never more requests on the wire than the daemon allows; the rest wait and all complete', async () => {
    await withClient({}, async (client, hello) => {
      assert.equal(hello.maxInflight, MAX_INFLIGHT);
      const slow = holdWire(client, 200);
      const sets = Array.from({ length: 40 }, (_, i) => client.cache.set(`flow:${i}`, i));
      assert.deepEqual(client.requestCounts, { sent: MAX_INFLIGHT, queued: 40 });
      let maxSent = 0;
      const watch = setInterval(() => {
        maxSent = Math.max(maxSent, client.requestCounts.sent);
      }, 1);
      await Promise.all([...slow, ...sets]);
      clearInterval(watch);
      assert.ok(maxSent <= MAX_INFLIGHT, `saw ${maxSent} requests on the wire`);
      assert.deepEqual(client.requestCounts, { sent: 0, queued: 0 });
      const got = await client.cache.mget(Array.from({ length: 40 }, (_, i) => `flow:${i}`));
      assert.deepEqual(got.map((g) => g.value), Array.from({ length: 40 }, (_, i) => i));
    });
  });

  test('beyond maxQueued a call rejects at once with CLIENT_OVERLOADED; the others are unharmed', async () => {
    await withClient({ maxQueued: 5 }, async (client) => {
      const slow = holdWire(client, 200);
      const sets = Array.from({ length: 8 }, (_, i) => client.cache.set(`shed:${i}`, i).then(
        () => 'stored',
        (err) => err,
      ));
      const results = await Promise.all(sets);
      await Promise.all(slow);
      assert.deepEqual(results.slice(0, 5), Array(5).fill('stored'));
      for (const err of results.slice(5)) {
        assert.ok(err instanceof SatchelError);
        assert.equal(err.code, 'CLIENT_OVERLOADED');
        assert.equal(err.op, 'cache.set');
      }
      const got = await client.cache.mget(Array.from({ length: 8 }, (_, i) => `shed:${i}`));
      assert.deepEqual(got.map((g) => g.hit), [true, true, true, true, true, false, false, false]);
    });
  });

  test('a request that times out while queued is never sent', async () => {
    await withClient({ requestTimeoutMs: 100 }, async (client) => {
      // The pings time out client-side too, but the daemon holds them for 300 ms, so
      // the wire stays full and the set waits behind them until its own deadline.
      const slow = holdWire(client, 300).map((p) => p.catch((err) => err.code));
      const queuedSet = client.cache.set('never-sent', 1).catch((err) => err.code);
      assert.equal(await queuedSet, 'CLIENT_TIMEOUT');
      assert.deepEqual(await Promise.all(slow), Array(MAX_INFLIGHT).fill('CLIENT_TIMEOUT'));
      // The wire frees when the daemon answers the pings; later requests flow again.
      const probe = new SatchelClient({ socket: stack.socket });
      try {
        await eventually('the pings to be answered', () => client.requestCounts.sent === 0, 5000);
        assert.equal(await client.ping(), 'pong');
        assert.deepEqual(await probe.cache.get('never-sent'), { hit: false });
      } finally {
        probe.close();
      }
    });
  });

  test('a dropped connection rejects queued requests as never sent', async () => {
    await withClient({}, async (client) => {
      const slow = holdWire(client, 5000).map((p) => p.catch((err) => err));
      const queued = client.cache.set('dropped', 1).catch((err) => err);
      client.conn.socket.destroy();
      const err = await queued;
      assert.equal(err.code, 'DISCONNECTED');
      assert.match(err.message, /never sent/);
      for (const e of await Promise.all(slow)) {
        assert.equal(e.code, 'DISCONNECTED');
        assert.doesNotMatch(e.message, /never sent/);
      }
    });
  });
});
