// A Node worker beside a Rust app that embeds satchel (examples/embedded.rs): the app
// caches and mails through its in-process handle, the worker uses the app's socket, and
// each sees the other's writes.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SatchelClient } from '../index.js';
import { startRedis, freePort, eventually, SATCHEL_BIN } from './harness.js';

const APP = path.join(path.dirname(SATCHEL_BIN), 'examples', 'embedded');
let dir;
let redis;
let app;
let http;
let socket;

before(async () => {
  assert.ok(fs.existsSync(APP), `build it first: cargo build --example embedded (${APP})`);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'satchel-embedded-'));
  redis = await startRedis(dir);
  socket = path.join(dir, 'app.sock');
  http = await freePort();
  app = spawn(APP, [], {
    env: {
      ...process.env,
      SATCHEL_SERVER_SOCKET: socket,
      SATCHEL_REDIS_URL: redis.url,
      SATCHEL_MAIL_ENABLED: 'false',
      EMBEDDED_LISTEN: `127.0.0.1:${http}`,
    },
    stdio: 'ignore',
  });
  await eventually('the embedded app', async () => fs.existsSync(socket) && (await fetch(`http://127.0.0.1:${http}/loads`)).ok);
});

after(async () => {
  app?.kill('SIGTERM');
  await redis?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

test('a Node worker on the embedding app\'s socket shares its cache', async () => {
  const worker = new SatchelClient({ socket, clientName: 'node-worker' });
  // The app loads exam 7 through its in-process cache-aside…
  const page = await (await fetch(`http://127.0.0.1:${http}/exam/7`)).text();
  assert.match(page, /Exam 7: Algebra I final/);
  // …and the worker reads the value it stored, over the socket.
  const got = await worker.cache.get('exam:7');
  assert.equal(got.hit, true);
  assert.equal(got.value.title, 'Exam 7: Algebra I final');
  // What the worker stores is the app's next hit: nothing is loaded.
  await worker.cache.set('exam:9', { id: 9, title: 'set by the Node worker' }, { ttlMs: 60_000 });
  const nine = await (await fetch(`http://127.0.0.1:${http}/exam/9`)).text();
  assert.match(nine, /set by the Node worker/);
  assert.equal((await (await fetch(`http://127.0.0.1:${http}/loads`)).text()).trim(), '1');
  worker.close();
});
