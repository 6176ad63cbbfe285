// Drives exam-service over HTTP against the real satchel daemon, a private Redis and a
// real SMTP server (the repository's tests/smtp_sink.py, python3 + aiosmtpd): publishing
// results must put exactly one "results published" mail per student on the wire.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient } from 'satchel-client';
import { startStack, eventually } from '../../../clients/node/test/harness.js';
import { startSmtpSink } from './smtp-sink.js';
import { createExamService } from '../server.js';
import { ExamDb } from '../db.js';

let sink;
let stack;
let satchel;
let server;
let base;
let db;
const mailCalls = [];
const logs = [];

// A student whose mail server refuses the address for good (the sink answers RCPT with 550).
const REFUSED = { id: 's4', name: 'Kurt', email: 'reject550+s4@students.example' };

before(async () => {
  sink = await startSmtpSink();
  stack = await startStack({
    SATCHEL_MAIL_TRANSPORT: 'smtp',
    SATCHEL_MAIL_SMTP_URL: sink.url,
    // Fast retries and timeouts: a transient failure must not outlive the test.
    SATCHEL_MAIL_RETRY_BASE_MS: '50',
    SATCHEL_MAIL_RETRY_MAX_MS: '200',
    SATCHEL_MAIL_MAX_ATTEMPTS: '3',
    SATCHEL_MAIL_SMTP_CONNECT_TIMEOUT_MS: '2000',
    SATCHEL_MAIL_SMTP_COMMAND_TIMEOUT_MS: '5000',
  });
  satchel = new SatchelClient({ socket: stack.socket, clientName: 'exam-service-test' });
  assert.ok(
    await satchel.supports('mail.send'),
    `the daemon at ${stack.daemon.bin} does not offer mail.send: rebuild it (cargo build) or set SATCHEL_BIN`,
  );
  // Record every mail.send the service makes, then let it through to the daemon.
  const realSend = satchel.mail.send.bind(satchel.mail);
  satchel.mail.send = (m) => {
    mailCalls.push(m);
    return realSend(m);
  };
  db = new ExamDb({ latencyMs: 20 });
  db.students.set(REFUSED.id, { ...REFUSED });
  server = createExamService({ satchel, db, log: (l) => logs.push(l) });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  if (server) await new Promise((r) => server.close(r));
  satchel?.close();
  await stack?.stop();
  await sink?.stop();
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

let published1; // the first publish answer of exam 1, for the mail tests below

test('publishing invalidates the cached results and list, and queues one mail per student', async () => {
  assert.deepEqual((await http('GET', '/exams/1/results')).body, []);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's1', score: 91 })).status, 201);
  assert.equal((await http('POST', '/exams/1/results', { studentId: 's2', score: 78 })).status, 201);
  // Drafts are invisible and the cached (empty) answer stands until publish.
  assert.deepEqual((await http('GET', '/exams/1/results')).body, []);
  const resultLoads = db.queries.listResults;
  const listLoads = db.queries.listExams;

  const pub = await http('POST', '/exams/1/publish');
  published1 = pub.body;
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

  assert.equal(pub.body.mail.status, 'queued');
  assert.equal(pub.body.mail.reason, null);
  for (const m of pub.body.mail.mails) {
    assert.equal(typeof m.mailId, 'string');
    assert.equal(m.duplicate, false);
  }
});

// --- the mail path, end to end: service → satchel → Redis queue → worker → SMTP sink ---

const FINAL = new Set(['sent', 'dead', 'cancelled']);

/** Polls mail.status until the mail reaches a final status; resolves to that status. */
function settled(mailId) {
  return eventually(`mail ${mailId} to reach a final status`, async () => {
    const s = await satchel.mail.status(mailId);
    return FINAL.has(s.status) && s;
  });
}

/** The sink's messages whose Subject names `title`. */
const deliveredFor = (title) => sink.received().filter((m) => m.subject === `Results published: ${title}`);

/** Resolves once the daemon's queue is idle: nothing queued, scheduled, sending or retrying. */
function queueIdle() {
  return eventually('the mail queue to be idle', async () => {
    const { mail } = await satchel.stats();
    return mail.queued + mail.scheduled + mail.sending + mail.retrying === 0 && mail.queueDepth === 0 && mail;
  });
}

test('publishing delivers one "results published" mail per student to the SMTP server', async () => {
  assert.ok(published1, 'runs after the publish test');
  const byStudent = Object.fromEntries(published1.mail.mails.map((m) => [m.student, m.mailId]));
  assert.deepEqual(Object.keys(byStudent).sort(), ['s1', 's2']);

  for (const mailId of Object.values(byStudent)) {
    const s = await settled(mailId);
    assert.equal(s.status, 'sent', `mail ${mailId}: ${s.lastError}`);
    assert.equal(s.attempts, 1);
  }

  const got = deliveredFor('Algebra I — final');
  assert.equal(got.length, 2, `the sink received ${got.length} exam-1 mails`);
  for (const [studentId, mailId] of Object.entries(byStudent)) {
    const student = db.students.get(studentId);
    const mine = got.filter((m) => m.to === student.email);
    assert.equal(mine.length, 1, `exactly one mail to ${student.email}`);
    const [m] = mine;
    // The envelope and the headers.
    assert.deepEqual(m.rcptTos, [student.email]);
    assert.equal(m.mailFrom, 'exams@school.example');
    assert.equal(m.from, 'exams@school.example');
    assert.equal(m.subject, 'Results published: Algebra I — final');
    // The mail on the wire is the one the service queued (Message-ID carries the mail_id).
    assert.equal(m.messageId, `<${mailId}@school.example>`);
    // The body the service wrote, decoded from its transfer encoding.
    assert.equal(
      m.text.trimEnd(),
      `Hello ${student.name},\n\nthe results of "Algebra I — final" are published. See the exam portal.`,
    );
  }

  const health = await http('GET', '/health');
  assert.equal(health.status, 200, JSON.stringify(health.body));
  assert.deepEqual(health.body.mail, { status: 'ok', reason: null, outbox: 0 });
  assert.ok(!logs.some((l) => /mail degraded/.test(l)), logs.join('\n'));
});

test('publishing the same exam again sends no duplicate mail (idempotency keys)', async () => {
  const sentBefore = (await queueIdle()).sent;
  const callsBefore = mailCalls.length;

  const again = await http('POST', '/exams/1/publish');
  assert.equal(again.status, 200);
  assert.equal(again.body.mail.status, 'queued');
  // The service did ask again, once per student ...
  assert.deepEqual(
    mailCalls.slice(callsBefore).map((m) => m.idempotencyKey).sort(),
    ['results-published:1:s1', 'results-published:1:s2'],
  );
  // ... and the daemon answered with the first mails, already sent, and queued nothing.
  const first = Object.fromEntries(published1.mail.mails.map((m) => [m.student, m.mailId]));
  for (const m of again.body.mail.mails) {
    assert.equal(m.duplicate, true);
    assert.equal(m.mailId, first[m.student]);
    assert.equal(m.status, 'sent');
  }

  // Had anything been queued it would show in the counters until delivered, and then
  // in the sink: wait for an idle queue and check both.
  const idle = await queueIdle();
  assert.equal(idle.sent, sentBefore, 'no further mail was sent');
  assert.equal(deliveredFor('Algebra I — final').length, 2, 'the sink still has exactly two exam-1 mails');
});

test('a recipient refused with 550 is dead in mail.status while the other students get their mail', async () => {
  for (const [studentId, score] of [['s1', 64], ['s3', 88], [REFUSED.id, 71]]) {
    assert.equal((await http('POST', '/exams/3/results', { studentId, score })).status, 201);
  }
  const pub = await http('POST', '/exams/3/publish');
  assert.equal(pub.status, 200);
  // Queuing succeeds for all three: the refusal comes later, from the SMTP server.
  assert.equal(pub.body.mail.status, 'queued');
  const byStudent = Object.fromEntries(pub.body.mail.mails.map((m) => [m.student, m.mailId]));
  assert.deepEqual(Object.keys(byStudent).sort(), ['s1', 's3', 's4']);

  const refused = await settled(byStudent[REFUSED.id]);
  assert.equal(refused.status, 'dead');
  assert.equal(refused.attempts, 1, 'a 5xx is permanent: no retry');
  assert.match(refused.lastError, /550/);
  assert.ok(refused.lastError.includes(REFUSED.email), refused.lastError);
  const dead = await satchel.mail.dead();
  const listed = dead.find((d) => d.mailId === byStudent[REFUSED.id]);
  assert.ok(listed, 'mail.dead lists the refused mail');
  assert.deepEqual(listed.to, [REFUSED.email]);
  assert.equal(listed.subject, 'Results published: European History — essay');

  for (const id of ['s1', 's3']) {
    const s = await settled(byStudent[id]);
    assert.equal(s.status, 'sent', `${id}: ${s.lastError}`);
  }
  const got = deliveredFor('European History — essay');
  assert.deepEqual(got.map((m) => m.to).sort(), ['ada@students.example', 'edsger@students.example']);
  for (const m of got) {
    const student = [...db.students.values()].find((s) => s.email === m.to);
    assert.ok(m.text.startsWith(`Hello ${student.name},\n`), m.text);
    assert.equal(m.messageId, `<${byStudent[student.id]}@school.example>`);
  }
  assert.ok(
    sink.received().every((m) => !m.rcptTos.includes(REFUSED.email)),
    'nothing reached the refused address',
  );
});
