// mail.* against the real daemon. Skipped, loudly, while the daemon's hello does not
// list mail.send; these start running as soon as the mail ops land.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelClient, SatchelError } from '../index.js';
import { startStack } from './harness.js';

let stack;
let client;
let skip = false;

before(async () => {
  stack = await startStack();
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

test('mail.send queues a mail and mail.status finds it', async (t) => {
  if (skip) return t.skip(skip);
  const r = await client.mail.send({ to: 'student@example.test', subject: 'Results', text: 'out', idempotencyKey: 'k-1' });
  assert.equal(typeof r.mailId, 'string');
  assert.equal(r.duplicate, false);
  const again = await client.mail.send({ to: 'student@example.test', subject: 'Results', text: 'out', idempotencyKey: 'k-1' });
  assert.equal(again.mailId, r.mailId);
  assert.equal(again.duplicate, true);
  const s = await client.mail.status(r.mailId);
  assert.equal(s.mailId, r.mailId);
  assert.equal(typeof s.status, 'string');
});

test('mail.send without recipients is INVALID_MAIL naming the field', async (t) => {
  if (skip) return t.skip(skip);
  await assert.rejects(client.mail.send({ to: [], subject: 's', text: 't' }), (e) => e instanceof SatchelError && e.code === 'INVALID_MAIL' && e.field === 'to');
});

test('mail.status of an unknown id is NOT_FOUND', async (t) => {
  if (skip) return t.skip(skip);
  await assert.rejects(client.mail.status('no-such-mail'), (e) => e.code === 'NOT_FOUND');
});

test('mail.dead lists dead mails', async (t) => {
  if (skip) return t.skip(skip);
  assert.ok(Array.isArray(await client.mail.dead({ limit: 5 })));
});
