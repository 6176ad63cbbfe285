// Test harness: a private redis-server on a free port and a satchel daemon on a socket in
// a temp dir. Never touches a Redis the machine already runs.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The daemon binary: SATCHEL_BIN, else target/debug/satchel of this repository. */
export const SATCHEL_BIN = process.env.SATCHEL_BIN
  ? path.resolve(process.env.SATCHEL_BIN)
  : path.resolve(here, '../../../target/debug/satchel');

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns truthy or `timeoutMs` passes (then throws `what`). */
export async function eventually(what, check, timeoutMs = 10000, everyMs = 20) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

function canConnect(opts) {
  return new Promise((resolve) => {
    const s = net.createConnection(opts);
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

function exited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitExit(child) {
  if (exited(child)) return Promise.resolve();
  return new Promise((r) => child.once('exit', () => r()));
}

export async function startRedis(dir) {
  const port = await freePort();
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  await eventually('redis-server to listen', () => !exited(child) && canConnect({ port, host: '127.0.0.1' }));
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    child,
    async stop() {
      if (!exited(child)) child.kill('SIGKILL');
      await waitExit(child);
    },
  };
}

export class Daemon {
  constructor(socket, redisUrl, env = {}, bin = SATCHEL_BIN) {
    this.socket = socket;
    this.redisUrl = redisUrl;
    this.env = env;
    this.bin = bin;
    this.child = null;
    this.log = '';
  }

  async start() {
    if (!fs.existsSync(this.bin)) {
      throw new Error(`satchel binary not found at ${this.bin}: run \`cargo build\` or set SATCHEL_BIN`);
    }
    const env = { PATH: process.env.PATH, HOME: process.env.HOME ?? '/tmp' };
    Object.assign(env, {
      SATCHEL_SERVER_SOCKET: this.socket,
      SATCHEL_REDIS_URL: this.redisUrl,
      SATCHEL_LOG_LEVEL: 'warn',
      ...this.env,
    });
    const child = spawn(this.bin, ['serve'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr.on('data', (d) => {
      this.log += d.toString();
    });
    this.child = child;
    await eventually(
      `satchel to accept on ${this.socket}`,
      () => {
        if (exited(child)) throw new Error(`satchel exited: ${this.log}`);
        return canConnect({ path: this.socket });
      },
    );
    return this;
  }

  async stop(signal = 'SIGTERM') {
    if (this.child && !exited(this.child)) this.child.kill(signal);
    if (this.child) await waitExit(this.child);
  }
}

/**
 * Starts redis + daemon in a fresh temp dir; `stop()` tears both down and removes the dir.
 * `env` (extra daemon environment) may be a function of that dir.
 */
export async function startStack(env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'satchel-node-'));
  const redis = await startRedis(dir);
  const extra = typeof env === 'function' ? env(dir) : env;
  const daemon = await new Daemon(path.join(dir, 'satchel.sock'), redis.url, extra).start();
  return {
    dir,
    redis,
    daemon,
    socket: daemon.socket,
    async stop() {
      await daemon.stop('SIGKILL');
      await redis.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
