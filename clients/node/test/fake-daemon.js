// A stand-in daemon for encoding tests: decodes each request frame, records it, and
// answers through a handler. Used where the real daemon lacks an op (mail, for now).

import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { encode, decode } from '@msgpack/msgpack';

export async function startFakeDaemon(handler, { ops = ['hello', 'ping'] } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'satchel-fake-'));
  const socket = path.join(dir, 'fake.sock');
  const requests = [];
  const conns = new Set();
  const server = net.createServer((conn) => {
    conns.add(conn);
    conn.on('close', () => conns.delete(conn));
    let buf = Buffer.alloc(0);
    conn.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const n = buf.readUInt32BE(0);
        const req = decode(buf.subarray(4, 4 + n));
        buf = buf.subarray(4 + n);
        let reply;
        if (req.op === 'hello') {
          reply = { id: req.id, ok: true, result: { protocol: 1, server: 'fake/0', max_frame: 8388608, max_inflight: 1024, ops } };
        } else {
          requests.push(req);
          reply = { id: req.id, ...handler(req) };
        }
        const body = encode(reply);
        const head = Buffer.alloc(4);
        head.writeUInt32BE(body.length, 0);
        conn.write(Buffer.concat([head, body]));
      }
    });
    conn.on('error', () => {});
  });
  await new Promise((r) => server.listen(socket, r));
  return {
    socket,
    requests,
    async stop() {
      // server.close() waits for open connections: end them first, so the temp dir
      // is always removed.
      for (const c of conns) c.destroy();
      try {
        await new Promise((r) => server.close(r));
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}
