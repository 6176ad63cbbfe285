// mail.* against the real daemon. Skipped, loudly, while the daemon's hello does not
// list mail.send; these start running as soon as the mail ops land. The daemon uses the
// file transport into this test's temp dir (`<mail_id>.eml` per delivered mail).
//
// Written against the mail branch's code as of its first commit, and not yet run
// against a daemon that has the ops: adjust here if the merged ops differ.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { SatchelClient, SatchelError } from '../index.js';
import { startStack, eventually } from './harness.js';

let stack;
let client;
let skip = false;
let mailDir;

before(async () => {
  stack = await startStack((dir) => {
    mailDir = path.join(dir, 'mail');
    return { SATCHEL_MAIL_TRANSPORT: 'file', SATCHEL_MAIL_FILE_DIR: mailDir };
  });
  client = new SatchelClient({ socket: stack.socket });
  if (!(await client.supports('mail.send'))) {
    skip = 'SKIPPED: the daemon does not offer mail.send (hello ops lacks it); mail tests need the mail ops';
    console.log(`\n*** ${skip} ***\n`);
  }
});

after(async () => {
  client?.close();
  await stack?.stop();
});

test('a queued mail is delivered and its status says sent', async (t) => {
  if (skip) return t.skip(skip);
  const r = await client.mail.send({
    to: 'student@example.test',
    subject: 'Results',
    text: 'out',
    attachments: [{ filename: 'r.txt', contentType: 'text/plain', data: Buffer.from('91/100') }],
  });
  assert.equal(typeof r.mailId, 'string');
  assert.equal(r.duplicate, false);
  const s = await eventually('the mail to be sent', async () => {
    const st = await client.mail.status(r.mailId);
    return st.status === 'sent' && st;
  });
  assert.equal(s.mailId, r.mailId);
  assert.ok(fs.existsSync(path.join(mailDir, `${r.mailId}.eml`)), 'the file transport wrote the mail');
});

test('an idempotency key returns the first mail with duplicate: true', async (t) => {
  if (skip) return t.skip(skip);
  const m = { to: ['student@example.test'], subject: 'Results', text: 'out', idempotencyKey: 'node-k-1' };
  const first = await client.mail.send(m);
  const again = await client.mail.send(m);
  assert.equal(again.mailId, first.mailId);
  assert.equal(again.duplicate, true);
});

test('a scheduled mail can be cancelled', async (t) => {
  if (skip) return t.skip(skip);
  const r = await client.mail.send({ to: 'a@example.test', subject: 'later', text: 't', sendAtMs: Date.now() + 3_600_000 });
  assert.equal((await client.mail.cancel(r.mailId)).cancelled, true);
  assert.equal((await client.mail.status(r.mailId)).status, 'cancelled');
});

test('validation and lookup errors carry their codes', async (t) => {
  if (skip) return t.skip(skip);
  await assert.rejects(client.mail.send({ to: [], subject: 's', text: 't' }), (e) => e instanceof SatchelError && e.code === 'INVALID_MAIL' && e.field === 'to');
  await assert.rejects(client.mail.status('no-such-mail'), (e) => e.code === 'NOT_FOUND');
  const r = await client.mail.send({ to: 'a@example.test', subject: 'later', text: 't', sendAtMs: Date.now() + 3_600_000 });
  await assert.rejects(client.mail.retry(r.mailId), (e) => e.code === 'BAD_REQUEST' && e.field === 'mail_id');
});

test('mail.dead lists dead mails', async (t) => {
  if (skip) return t.skip(skip);
  assert.ok(Array.isArray(await client.mail.dead({ limit: 5 })));
});

const statusesOf = (events, mailId) => events.filter((e) => e.mailId === mailId).map((e) => e.status);

test('mail.events iterates in order, ends without follow, and resumes from the cursor', async (t) => {
  if (skip) return t.skip(skip);
  const head = client.mail.events({ follow: false });
  for await (const e of head) assert.fail(`nothing expected yet, got ${JSON.stringify(e)}`);
  const r = await client.mail.send({ to: 'student@example.test', subject: 'Results', text: 'out' });
  await eventually('the mail to be sent', async () => (await client.mail.status(r.mailId)).status === 'sent');
  const stream = client.mail.events({ since: head.cursor, follow: false });
  const events = [];
  for await (const e of stream) events.push(e);
  assert.deepEqual(statusesOf(events, r.mailId), ['queued', 'sending', 'sent']);
  assert.equal(stream.cursor, events.at(-1).eventId);
  assert.equal(typeof events[0].atMs, 'number');
  const again = [];
  for await (const e of client.mail.events({ since: stream.cursor, follow: false })) again.push(e);
  assert.deepEqual(again, []);
  // Following: a long poll that a new mail wakes.
  const following = client.mail.events({ since: stream.cursor });
  const later = await client.mail.send({ to: 'a@example.test', subject: 'later', text: 't', sendAtMs: Date.now() + 3_600_000 });
  await client.mail.cancel(later.mailId);
  const first = await following.next();
  const second = await following.next();
  assert.deepEqual([first.value.status, second.value.status], ['scheduled', 'cancelled']);
  assert.equal(following.cursor, second.value.eventId);
});

test('mail.events with a bad cursor is a BAD_REQUEST on since', async (t) => {
  if (skip) return t.skip(skip);
  const stream = client.mail.events({ since: 'garbage', follow: false });
  await assert.rejects(stream.next(), (e) => e.code === 'BAD_REQUEST' && e.field === 'since');
});

test('the suppression list: add, a suppressed send, list, remove', async (t) => {
  if (skip) return t.skip(skip);
  await client.mail.suppression.add('Gone@Example.COM', { reason: 'left the school' });
  const r = await client.mail.send({ to: 'Gone@example.com', subject: 's', text: 't' });
  assert.equal(r.status, 'suppressed');
  assert.deepEqual(r.suppressed, ['Gone@example.com']);
  const { entries, cursor } = await client.mail.suppression.list();
  assert.equal(cursor, undefined);
  const e = entries.find((x) => x.address === 'Gone@example.com');
  assert.equal(e.class, 'manual');
  assert.equal(e.reason, 'left the school');
  assert.equal(typeof e.atMs, 'number');
  assert.deepEqual(await client.mail.suppression.remove('Gone@example.com'), { removed: true });
  assert.deepEqual(await client.mail.suppression.remove('Gone@example.com'), { removed: false });
  await assert.rejects(client.mail.suppression.add('a@b.c\r\nRCPT TO:<x@y>'), (err) => err.code === 'BAD_REQUEST' && err.field === 'address');
});

test('shared templates: put, send with vars (html escaped), get, list, delete', async (t) => {
  if (skip) return t.skip(skip);
  await client.mail.template.put('node-results', { subject: 'Results for {{ name }}', html: '<p>{{ name }}: {{ score }}</p>' });
  assert.ok((await client.mail.template.list()).includes('node-results'));
  assert.equal((await client.mail.template.get('node-results')).subject, 'Results for {{ name }}');
  const r = await client.mail.send({ to: 'a@example.test', template: 'node-results', vars: { name: '<b>Ann</b>', score: 91 } });
  await eventually('the mail to be sent', async () => (await client.mail.status(r.mailId)).status === 'sent');
  const eml = fs.readFileSync(path.join(mailDir, `${r.mailId}.eml`), 'utf8');
  assert.ok(eml.includes('&lt;b&gt;Ann&lt;&#x2f;b&gt;: 91'), eml);
  await assert.rejects(client.mail.send({ to: 'a@example.test', template: 'node-results', vars: { name: 'x' } }),
    (e) => e.code === 'INVALID_MAIL' && e.field === 'vars' && e.message.includes('`score`'));
  assert.deepEqual(await client.mail.template.delete('node-results'), { deleted: true });
});
