// A real SMTP server for the exam-service tests: the repository's tests/smtp_sink.py
// (python3 + aiosmtpd) on a free port. It appends every accepted message to a JSON-lines
// file ({mail_from, rcpt_tos, data, ...}); `received()` reads them back, parsed.
//
// Per-recipient behaviour comes from the address's local part (see the script's
// docstring): `reject550+anything@…` is refused with 550, everything else accepted.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../../../clients/node/test/harness.js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const SINK_SCRIPT = path.resolve(here, '../../../tests/smtp_sink.py');

/** Starts the sink; resolves once it has printed `READY <port>` (bounded by `timeoutMs`). */
export async function startSmtpSink({ timeoutMs = 15000 } = {}) {
  const check = spawnSync('python3', ['-c', 'import aiosmtpd'], { stdio: 'ignore' });
  if (check.status !== 0) {
    throw new Error('the exam-service mail tests need python3 with aiosmtpd: `pip install aiosmtpd`');
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'exam-service-smtp-'));
  const out = path.join(dir, 'received.jsonl');
  const port = await freePort();
  const child = spawn('python3', [SINK_SCRIPT, '--port', String(port), '--out', out], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d.toString();
  });
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`SMTP sink did not start on port ${port} within ${timeoutMs} ms:\n${stderr}`)),
        timeoutMs,
      );
      child.stdout.on('data', (d) => {
        stdout += d.toString();
        if (stdout.includes(`READY ${port}`)) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`SMTP sink exited (${code ?? signal}) before it was ready:\n${stderr}`));
      });
    });
  } catch (err) {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }

  return {
    port,
    url: `smtp://127.0.0.1:${port}`,
    /** Every message accepted so far, oldest first, each parsed (see parseMessage). */
    received() {
      let text = '';
      try {
        text = fs.readFileSync(out, 'utf8');
      } catch (err) {
        if (err.code !== 'ENOENT') throw err;
      }
      return text
        .split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => {
          const r = JSON.parse(l);
          return { mailFrom: r.mail_from, rcptTos: r.rcpt_tos, raw: r.data, ...parseMessage(r.data) };
        });
    },
    get log() {
      return stderr;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Decodes RFC 2047 encoded words (`=?utf-8?b?…?=`, `=?utf-8?q?…?=`) in a header value. */
export function decodeHeader(value) {
  return value
    .replace(/(=\?[^?]+\?[bBqQ]\?[^?]*\?=)\s+(?==\?)/g, '$1') // space between encoded words is not text
    .replace(/=\?([^?]+)\?([bBqQ])\?([^?]*)\?=/g, (_, charset, enc, text) => {
      const bytes =
        enc.toLowerCase() === 'b'
          ? Buffer.from(text, 'base64')
          : qpBytes(text.replace(/_/g, ' '));
      return new TextDecoder(charset).decode(bytes);
    });
}

function qpBytes(s) {
  const parts = [];
  let last = 0;
  for (const m of s.matchAll(/=([0-9A-Fa-f]{2})/g)) {
    parts.push(Buffer.from(s.slice(last, m.index), 'utf8'), Buffer.from([parseInt(m[1], 16)]));
    last = m.index + 3;
  }
  parts.push(Buffer.from(s.slice(last), 'utf8'));
  return Buffer.concat(parts);
}

/**
 * A single-part message as the daemon renders it: `{headers: {lowercase name: decoded
 * value}, to, from, subject, messageId, text}` with the body decoded from its
 * Content-Transfer-Encoding and line ends normalised to `\n`.
 */
export function parseMessage(raw) {
  const split = raw.indexOf('\r\n\r\n');
  const head = split < 0 ? raw : raw.slice(0, split);
  const body = split < 0 ? '' : raw.slice(split + 4);
  const headers = {};
  for (const line of head.replace(/\r\n(?=[ \t])/g, '').split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    headers[line.slice(0, colon).trim().toLowerCase()] = decodeHeader(line.slice(colon + 1).trim());
  }
  const type = headers['content-type'] ?? 'text/plain';
  if (/^multipart\//i.test(type)) throw new Error(`parseMessage handles single-part mail only, got ${type}`);
  const cte = (headers['content-transfer-encoding'] ?? '7bit').toLowerCase();
  let bytes;
  if (cte === 'quoted-printable') bytes = qpBytes(body.replace(/=\r\n/g, ''));
  else if (cte === 'base64') bytes = Buffer.from(body.replace(/\s+/g, ''), 'base64');
  else bytes = Buffer.from(body, 'utf8');
  return {
    headers,
    to: headers.to,
    from: headers.from,
    subject: headers.subject,
    messageId: headers['message-id'],
    text: new TextDecoder('utf-8').decode(bytes).replace(/\r\n/g, '\n'),
  };
}
