// Drives exam-service over HTTP against the real satchel daemon and a private Redis.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient } from 'satchel-client';
import { startStack } from '../../../clients/node/test/harness.js';
import { createExamService } from '../server.js';
import { ExamDb } from '../db.js';

let stack;
let satchel;
let server;
let base;
let db;
const mailCalls = [];
const logs = [];

before(async () => {
  stack = await startStack();
  satchel = new SatchelClient({ socket: stack.socket, clientName: 'exam-service-test' });
  // Record every mail.send the service makes, then let it through to the daemon.
  const realSend = satchel.mail.send.bind(satchel.mail);
  satchel.mail.send = (m) => {
    mailCalls.push(m);
    return realSend(m);
  };
  db = new ExamDb({ latencyMs: 20 });
  server = createExamService({ satchel, db, log: (l) => logs.push(l) });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  await new Promise((r) => server.close(r));
  satchel.close();
  await stack.stop();
});

async function http(method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, body: await res.json() };
}

test('the exam list is loaded once and then served from the cache', async () => {
  const a = await http('GET', '/exams');
  const b = await http('GET', '/exams');
  assert.equal(a.status, 200);
  assert.equal(a.body.length, 3);
  assert.deepEqual(b.body, a.body);
  assert.equal(db.queries.listExams, 1);
});

test('200 concurrent requests for one uncached exam query the database once', async () => {
  const replies = await Promise.all(Array.from({ length: 200 }, () => http('GET', '/exams/2')));
  for (const r of replies) assert.equal(r.body.title, 'Organic Chemistry — midterm');
  assert.equal(db.queries.getExam, 1);
});

test('unknown exams and bad input get 404 and 400', async () => {
  assert.equal((await http('GET', '/exams/99')).status, 404);
  assert.equal((await http('GET', '/exams/abc')).status, 400);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's1' })).status, 400);
  assert.equal((await http('POST', '/exams/99/publish')).status, 404);
});

test('publishing invalidates the cached results and list, and queues one mail per student', async () => {
  assert.deepEqual((await http('GET', '/exams/1/results')).body, []);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's1', score: 91 })).status, 201);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's2', score: 78 })).status, 201);
  // Drafts are invisible and the cached (empty) answer stands until publish.
  assert.deepEqual((await http('GET', '/exams/1/results')).body, []);
  const resultLoads = db.queries.listResults;
  const listLoads = db.queries.listExams;

  const pub = await http('POST', '/exams/1/publish');
  assert.equal(pub.status, 200);
  assert.equal(pub.body.published, true);
  assert.ok(pub.body.invalidated >= 2, `invalidated ${pub.body.invalidated}`);

  const results = await http('GET', '/exams/1/results');
  assert.deepEqual(
    results.body.map((r) => [r.studentId, r.score]).sort(),
    [['s1', 91], ['s2', 78]],
  );
  assert.equal(db.queries.listResults, resultLoads + 1);
  const list = await http('GET', '/exams');
  assert.equal(list.body.find((e) => e.id === 1).published, true);
  assert.equal(db.queries.listExams, listLoads + 1);

  // The mail calls: one per graded student, each with a stable idempotency key.
  const calls = mailCalls.filter((m) => m.idempotencyKey?.startsWith('results-published:1:'));
  assert.deepEqual(calls.map((m) => m.idempotencyKey).sort(), ['results-published:1:s1', 'results-published:1:s2']);
  assert.deepEqual(calls.map((m) => m.to).sort(), ['ada@students.example', 'grace@students.example']);
  for (const m of calls) assert.match(m.subject, /Results published: Algebra I/);

  if (await satchel.supports('mail.send')) {
    assert.equal(pub.body.mail.status, 'queued');
    for (const m of pub.body.mail.mails) assert.equal(typeof m.mailId, 'string');
  } else {
    // Degraded, and says so: in the publish answer, in /health and in the log.
    console.log('\n*** exam-service: daemon lacks mail.send; asserting the degraded mail state ***\n');
    assert.equal(pub.body.mail.status, 'degraded');
    assert.match(pub.body.mail.reason, /does not offer mail\.send/);
    for (const m of pub.body.mail.mails) assert.equal(m.error, 'UNKNOWN_OP');
    const health = await http('GET', '/health');
    assert.equal(health.status, 503);
    assert.equal(health.body.cache, 'ok');
    assert.equal(health.body.mail.status, 'degraded');
    assert.match(health.body.mail.reason, /mail\.send/);
    assert.equal(health.body.mail.outbox, 2);
    assert.ok(logs.some((l) => /mail degraded/.test(l)), 'the degradation is logged');
  }
});
