// mail.* request encoding and result decoding, against a stand-in daemon: the real
// daemon does not have the mail ops yet (see mail-daemon.test.js for the real thing).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient, SatchelError, mailToWire } from '../index.js';
import { startFakeDaemon } from './fake-daemon.js';

let fake;
let client;

before(async () => {
  fake = await startFakeDaemon((req) => {
    switch (req.op) {
      case 'mail.send':
        return { ok: true, result: { mail_id: 'm-1', status: 'queued', duplicate: false } };
      case 'mail.status':
        return { ok: true, result: { mail_id: req.mail_id, status: 'retrying', attempts: 2, last_error: '451 later', next_attempt_ms: 99, updated_ms: 5 } };
      case 'mail.cancel':
        return { ok: true, result: { cancelled: true } };
      case 'mail.retry':
        return { ok: false, error: { code: 'NOT_FOUND', message: 'no such mail' } };
      case 'mail.dead':
        return { ok: true, result: [{ mail_id: 'm-9', to: ['a@x.test'], subject: 's', attempts: 5, last_error: '550', dead_ms: 7 }] };
      default:
        return { ok: false, error: { code: 'UNKNOWN_OP', message: 'unknown', field: 'op' } };
    }
  });
  client = new SatchelClient({ socket: fake.socket });
});

after(async () => {
  client?.close();
  await fake?.stop();
});

const last = () => fake.requests[fake.requests.length - 1];

test('mail.send maps camelCase options to the wire fields and the result back', async () => {
  const r = await client.mail.send({
    to: 'student@example.test',
    cc: ['a@example.test'],
    from: 'exams@example.test',
    replyTo: 'office@example.test',
    subject: 'Results published',
    text: 'Your results are out.',
    html: '<p>Your results are out.</p>',
    headers: { 'X-Exam-Id': '42' },
    attachments: [{ filename: 'r.pdf', contentType: 'application/pdf', data: Buffer.from('%PDF') }],
    idempotencyKey: 'results:42:7',
    sendAtMs: 1700000000000,
    bcc: undefined,
  });
  assert.deepEqual(r, { mailId: 'm-1', status: 'queued', duplicate: false });
  const req = last();
  assert.equal(req.op, 'mail.send');
  assert.deepEqual(req.to, ['student@example.test'], 'a single recipient becomes a list');
  assert.deepEqual(req.cc, ['a@example.test']);
  assert.equal(req.reply_to, 'office@example.test');
  assert.equal(req.idempotency_key, 'results:42:7');
  assert.equal(req.send_at_ms, 1700000000000);
  assert.deepEqual(req.headers, { 'X-Exam-Id': '42' }, 'header names are data, not converted');
  assert.equal(req.attachments[0].content_type, 'application/pdf');
  assert.ok(req.attachments[0].data instanceof Uint8Array, 'attachment data is bin');
  assert.equal(Buffer.from(req.attachments[0].data).toString(), '%PDF');
  assert.ok(!('bcc' in req), 'undefined options are not sent');
  assert.ok(!('replyTo' in req) && !('idempotencyKey' in req));
});

test('string attachment data is sent as bin (UTF-8)', () => {
  const w = mailToWire({ to: 'a@b.test', subject: 's', text: 't', attachments: [{ filename: 'a.txt', data: 'hi' }] });
  assert.ok(Buffer.isBuffer(w.attachments[0].data));
});

test('mail.status / cancel / dead send mail_id or limit and camelCase the results', async () => {
  const s = await client.mail.status('m-1');
  assert.deepEqual(last(), { id: last().id, op: 'mail.status', mail_id: 'm-1' });
  assert.deepEqual(s, { mailId: 'm-1', status: 'retrying', attempts: 2, lastError: '451 later', nextAttemptMs: 99, updatedMs: 5 });
  assert.deepEqual(await client.mail.cancel('m-1'), { cancelled: true });
  assert.equal(last().op, 'mail.cancel');
  const dead = await client.mail.dead({ limit: 10 });
  assert.equal(last().limit, 10);
  assert.deepEqual(dead, [{ mailId: 'm-9', to: ['a@x.test'], subject: 's', attempts: 5, lastError: '550', deadMs: 7 }]);
  await client.mail.dead();
  assert.ok(!('limit' in last()));
});

test('mail errors are SatchelErrors with the wire code', async () => {
  await assert.rejects(client.mail.retry('nope'), (e) => e instanceof SatchelError && e.code === 'NOT_FOUND' && e.op === 'mail.retry');
  assert.equal(last().mail_id, 'nope');
});
