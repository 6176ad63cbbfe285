// The default socket path: one rule for the daemon and every client (protocol.md,
// "Transport"), checked here against the rule's table and against the daemon itself.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { socketPathFor, defaultSocketPath } from '../index.js';
import { SATCHEL_BIN } from './harness.js';

test('root gets the system socket even with XDG_RUNTIME_DIR set; others get theirs', () => {
  assert.equal(socketPathFor(0, { XDG_RUNTIME_DIR: '/run/user/0' }), '/run/satchel/satchel.sock');
  assert.equal(socketPathFor(0, {}), '/run/satchel/satchel.sock');
  assert.equal(socketPathFor(1000, { XDG_RUNTIME_DIR: '/run/user/1000' }), '/run/user/1000/satchel/satchel.sock');
  assert.equal(socketPathFor(1000, { XDG_RUNTIME_DIR: '' }), '/tmp/satchel-1000/satchel.sock');
  assert.equal(socketPathFor(1000, {}), '/tmp/satchel-1000/satchel.sock');
  assert.equal(socketPathFor(0, { SATCHEL_SOCKET: '/x.sock', XDG_RUNTIME_DIR: '/r' }), '/x.sock');
});

test('this process and the daemon agree on the default socket with XDG_RUNTIME_DIR set', () => {
  const env = { ...process.env, XDG_RUNTIME_DIR: '/tmp/xdg-agree' };
  delete env.SATCHEL_SOCKET;
  delete env.SATCHEL_SERVER_SOCKET;
  const out = execFileSync(SATCHEL_BIN, ['check-config'], { env, encoding: 'utf8' });
  const daemon = /^socket = "(.*)"$/m.exec(out)?.[1];
  const saved = { x: process.env.XDG_RUNTIME_DIR, s: process.env.SATCHEL_SOCKET };
  process.env.XDG_RUNTIME_DIR = '/tmp/xdg-agree';
  delete process.env.SATCHEL_SOCKET;
  try {
    assert.equal(defaultSocketPath(), daemon);
  } finally {
    if (saved.x === undefined) delete process.env.XDG_RUNTIME_DIR;
    else process.env.XDG_RUNTIME_DIR = saved.x;
    if (saved.s !== undefined) process.env.SATCHEL_SOCKET = saved.s;
  }
});
