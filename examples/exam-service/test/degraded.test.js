// The degraded mail mode, against a stand-in daemon that has the cache ops but not
// mail.send (an older daemon): publishing still succeeds and says mail is degraded, the
// mails wait in the outbox, and the next publish after an upgrade flushes them.
// (service.test.js drives the real daemon and SMTP server.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient } from 'satchel-client';
import { startFakeDaemon } from '../../../clients/node/test/fake-daemon.js';
import { createExamService } from '../server.js';
import { ExamDb } from '../db.js';

let fake;
let satchel;
let server;
let base;
let db;
let hasMail = false; // flipped to simulate the daemon upgrade
const logs = [];

before(async () => {
  fake = await startFakeDaemon(
    (req) => {
      switch (req.op) {
        case 'health':
          return { ok: true, result: { redis: 'ok' } };
        case 'cache.invalidate':
          return { ok: true, result: { deleted: 0 } };
        case 'mail.send':
          if (hasMail) {
            return { ok: true, result: { mail_id: `m-${req.idempotency_key}`, status: 'queued', duplicate: false } };
          }
        // falls through: an old daemon does not know the op
        default:
          return { ok: false, error: { code: 'UNKNOWN_OP', message: `unknown op \`${req.op}\``, field: 'op' } };
      }
    },
    { ops: ['hello', 'ping', 'health', 'cache.invalidate'] },
  );
  satchel = new SatchelClient({ socket: fake.socket, clientName: 'exam-service-degraded-test' });
  db = new ExamDb({ latencyMs: 1 });
  server = createExamService({ satchel, db, log: (l) => logs.push(l) });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  if (server) await new Promise((r) => server.close(r));
  satchel?.close();
  await fake?.stop();
});

async function http(method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, body: await res.json() };
}

test('without mail.send, publish succeeds, reports degraded mail and keeps the mails', async () => {
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's1', score: 91 })).status, 201);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's2', score: 78 })).status, 201);
  const pub = await http('POST', '/exams/1/publish');
  assert.equal(pub.status, 200);
  assert.equal(pub.body.published, true);
  assert.equal(pub.body.mail.status, 'degraded');
  assert.match(pub.body.mail.reason, /does not offer mail\.send/);
  for (const m of pub.body.mail.mails) assert.equal(m.error, 'UNKNOWN_OP');

  const health = await http('GET', '/health');
  assert.equal(health.status, 503);
  assert.equal(health.body.cache, 'ok');
  assert.equal(health.body.mail.status, 'degraded');
  assert.match(health.body.mail.reason, /mail\.send/);
  assert.equal(health.body.mail.outbox, 2);
  assert.equal(logs.filter((l) => /mail degraded/.test(l)).length, 1, 'the degradation is logged once');
});

test('after the daemon gains mail.send, the next publish flushes the outbox first', async () => {
  hasMail = true;
  const before = fake.requests.length;
  const pub = await http('POST', '/exams/2/publish'); // no results: only the outbox goes out
  assert.equal(pub.status, 200);
  const sent = fake.requests.slice(before).filter((r) => r.op === 'mail.send');
  assert.deepEqual(sent.map((r) => r.idempotency_key).sort(), ['results-published:1:s1', 'results-published:1:s2']);
  assert.deepEqual(sent.map((r) => r.to).flat().sort(), ['ada@students.example', 'grace@students.example']);
  assert.equal(server.mailState.outbox.length, 0);
  assert.equal(server.mailState.status, 'ok');
});
