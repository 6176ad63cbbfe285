// Frames the daemon sends on its own (id nil) before closing a connection: the client
// turns them into a SatchelError with the daemon's code instead of a bare disconnect.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient, SatchelError } from '../index.js';
import { startStack, eventually } from './harness.js';

test('a peer outside allow_uids gets FORBIDDEN', async () => {
  const stack = await startStack({ SATCHEL_SERVER_ALLOW_UIDS: '4242424' });
  const c = new SatchelClient({ socket: stack.socket });
  try {
    await assert.rejects(c.ping(), (e) => e instanceof SatchelError && e.code === 'FORBIDDEN');
  } finally {
    c.close();
    await stack.stop();
  }
});

test('beyond max_connections a client gets UNAVAILABLE with retryAfterMs; it works once a slot frees', async () => {
  const stack = await startStack({ SATCHEL_SERVER_MAX_CONNECTIONS: '1' });
  const first = new SatchelClient({ socket: stack.socket });
  const second = new SatchelClient({ socket: stack.socket });
  try {
    // The harness's readiness probe may still hold the one slot for a moment.
    await eventually('the first client to connect', () => first.ping().then(() => true, () => false));
    await assert.rejects(second.ping(), (e) => e.code === 'UNAVAILABLE' && e.retryAfterMs > 0);
    first.close();
    await eventually('the second client to connect once a slot frees', () => second.ping().then(() => true, () => false));
  } finally {
    first.close();
    second.close();
    await stack.stop();
  }
});

test('calls after close() reject with CLOSED', async () => {
  const c = new SatchelClient({ socket: '/nonexistent/satchel.sock' });
  c.close();
  await assert.rejects(c.ping(), (e) => e.code === 'CLOSED');
});
