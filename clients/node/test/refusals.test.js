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

test('a daemon that accepts but never answers hello is UNREACHABLE after connectTimeoutMs', async () => {
  const net = await import('node:net');
  const fs = await import('node:fs');
  const os = await import('node:os');
  const path = await import('node:path');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'satchel-mute-'));
  const sockets = [];
  const server = net.createServer((s) => sockets.push(s));
  await new Promise((r) => server.listen(path.join(dir, 'mute.sock'), r));
  const c = new SatchelClient({ socket: path.join(dir, 'mute.sock'), connectTimeoutMs: 100 });
  try {
    const t0 = Date.now();
    await assert.rejects(c.ping(), (e) => e.code === 'UNREACHABLE' && /no hello/.test(e.message));
    assert.ok(Date.now() - t0 < 2000, 'gave up after the timeout, without retrying for long');
  } finally {
    c.close();
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
