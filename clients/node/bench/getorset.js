// getOrSet hits from Node.js: the satchel client (cache.fetch over the daemon's socket,
// answered from the daemon's near-cache) against node-redis 5 doing the same cache-aside
// straight to Redis (GET, JSON.parse; SET on a miss), without and with node-redis'
// own client-side cache (RESP3 `clientSideCache`, hits from the Node process' memory),
// and satchel with its in-process cache (`localCache`, kept coherent by the daemon's
// push frames).
// One private redis-server and daemon shared by all sides. Each side runs in a Node
// process of its own (as an app runs one client), a fresh one per run, sides
// alternating and their order reversed every other run; medians reported. With
// --shared, all four sides run in this one process instead (the earlier method: the
// clients' code, caches and garbage share one V8, which costs the satchel side about
// a third of its throughput at 64 in flight, BENCHMARKS.md).
//
//   cargo build --release && (cd clients/node && npm ci) &&
//   node clients/node/bench/getorset.js [--secs 2] [--runs 3] [--keys 10000] [--inflight 1,64] [--shared]
//
// SATCHEL_BIN picks the daemon (default: target/release/satchel).

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createClient } from 'redis';
import { SatchelClient } from '../index.js';
import { startRedis, Daemon } from '../test/harness.js';

const here = path.dirname(fileURLToPath(import.meta.url));
// Not the harness's default (the debug build): a benchmark measures the release daemon.
const SATCHEL_BIN = process.env.SATCHEL_BIN
  ? path.resolve(process.env.SATCHEL_BIN)
  : path.resolve(here, '../../../target/release/satchel');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const SECS = Number(arg('secs', 2));
const RUNS = Number(arg('runs', 3));
const KEYS = Number(arg('keys', 10000));
const INFLIGHT = arg('inflight', '1,64').split(',').map(Number);
const SHARED = process.argv.includes('--shared');
// Internal: run one side in this process against a running stack, print JSON results.
const CHILD = arg('child', null);

// A typical cached row: ~200 bytes of JSON.
const valueFor = (i) => ({
  id: i,
  title: `Exam ${i}: Algebra I final`,
  date: '2026-12-01',
  room: `B-${i % 40}`,
  seats: 120,
  published: false,
  notes: 'x'.repeat(60),
});

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

// `inflight` workers each loop one op at a time for `secs`; latency per op in µs.
async function measure(op, inflight, secs) {
  const lat = [];
  let next = 0;
  const end = performance.now() + secs * 1000;
  const worker = async () => {
    while (performance.now() < end) {
      const k = next++ % KEYS;
      const t0 = performance.now();
      await op(k);
      lat.push((performance.now() - t0) * 1000);
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: inflight }, worker));
  const elapsed = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  return { ops: lat.length / elapsed, p50: percentile(lat, 50), p99: percentile(lat, 99) };
}

const SIDE_NAMES = ['satchel', 'satchel local', 'node-redis', 'node-redis csc'];

// The clients of every side, connected to a running stack. Only the sides named are
// connected (a child process connects its own one).
async function connectSides(socket, redisUrl, names) {
  const conns = [];
  let loads = 0;
  const loader = async (k) => {
    loads += 1;
    return valueFor(k);
  };
  const sides = {};
  if (names.includes('satchel')) {
    const satchel = new SatchelClient({ socket, clientName: 'bench' });
    conns.push(() => satchel.close());
    sides.satchel = (k) => satchel.cache.getOrSet(`exam:${k}`, () => loader(k), { ttlMs: 3_600_000 });
  }
  if (names.includes('satchel local')) {
    // The same with the in-process cache: hits never leave this process.
    const satchelLocal = new SatchelClient({ socket, clientName: 'bench-local', localCache: { maxBytes: 64 << 20 } });
    conns.push(() => satchelLocal.close());
    sides['satchel local'] = (k) => satchelLocal.cache.getOrSet(`exam:${k}`, () => loader(k), { ttlMs: 3_600_000 });
  }
  if (names.includes('node-redis')) {
    const direct = createClient({ url: redisUrl });
    direct.on('error', () => {});
    await direct.connect();
    conns.push(() => direct.quit());
    // The cache-aside a Node backend writes by hand with node-redis.
    sides['node-redis'] = async (k) => {
      const key = `direct:exam:${k}`;
      const hit = await direct.get(key);
      if (hit !== null) return JSON.parse(hit);
      const v = await loader(k);
      await direct.set(key, JSON.stringify(v), { EX: 3600 });
      return v;
    };
  }
  if (names.includes('node-redis csc')) {
    const cached = createClient({ url: redisUrl, RESP: 3, clientSideCache: { ttl: 0, maxEntries: 0 } });
    cached.on('error', () => {});
    await cached.connect();
    conns.push(() => cached.quit());
    // The same with node-redis' client-side cache (the JSON is still parsed per hit).
    sides['node-redis csc'] = async (k) => {
      const key = `direct:exam:${k}`;
      const hit = await cached.get(key);
      if (hit !== null) return JSON.parse(hit);
      const v = await loader(k);
      await cached.set(key, JSON.stringify(v), { EX: 3600 });
      return v;
    };
  }
  const close = async () => {
    for (const c of conns) await c();
  };
  return { sides, close, loads: () => loads };
}

// Warm up (JIT, connections, and each side's cache: every key read twice).
async function warm(op) {
  for (let pass = 0; pass < 2; pass++) {
    for (let k = 0; k < KEYS; k += 100) {
      await Promise.all(Array.from({ length: Math.min(100, KEYS - k) }, (_, j) => op(k + j)));
    }
  }
  await measure(op, 16, 0.3);
}

async function child(name) {
  const { sides, close, loads } = await connectSides(process.env.BENCH_SOCKET, process.env.BENCH_REDIS, [name]);
  const op = sides[name];
  await warm(op);
  const results = {};
  for (const inflight of INFLIGHT) results[inflight] = await measure(op, inflight, SECS);
  await close();
  process.stdout.write(JSON.stringify({ results, loads: loads() }));
}

async function main() {
  if (CHILD !== null) return child(CHILD);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'satchel-bench-'));
  const redis = await startRedis(dir);
  const daemon = await new Daemon(path.join(dir, 'satchel.sock'), redis.url, {}, SATCHEL_BIN).start();
  console.log(`daemon: ${SATCHEL_BIN}; ${SHARED ? 'all sides in one process (--shared)' : 'each side in a process of its own'}`);
  const satchel = new SatchelClient({ socket: daemon.socket, clientName: 'bench' });
  const direct = createClient({ url: redis.url });
  direct.on('error', () => {});
  await direct.connect();
  // Both sides store the same values; every measured op is a hit.
  for (let i = 0; i < KEYS; i += 500) {
    const batch = [];
    for (let k = i; k < Math.min(KEYS, i + 500); k++) {
      batch.push(satchel.cache.set(`exam:${k}`, valueFor(k), { ttlMs: 3_600_000 }));
      batch.push(direct.set(`direct:exam:${k}`, JSON.stringify(valueFor(k)), { EX: 3600 }));
    }
    await Promise.all(batch);
  }
  satchel.close();
  await direct.quit();

  let loads = 0;
  const runs = Object.fromEntries(INFLIGHT.map((i) => [i, Object.fromEntries(SIDE_NAMES.map((n) => [n, []]))]));
  if (SHARED) {
    const shared = await connectSides(daemon.socket, redis.url, SIDE_NAMES);
    for (const name of SIDE_NAMES) await warm(shared.sides[name]);
    for (const inflight of INFLIGHT) {
      for (let r = 0; r < RUNS; r++) {
        for (const name of SIDE_NAMES) runs[inflight][name].push(await measure(shared.sides[name], inflight, SECS));
      }
    }
    await shared.close();
    loads = shared.loads();
  } else {
    const self = fileURLToPath(import.meta.url);
    const passOn = ['--secs', String(SECS), '--keys', String(KEYS), '--inflight', INFLIGHT.join(',')];
    for (let r = 0; r < RUNS; r++) {
      const order = r % 2 === 0 ? SIDE_NAMES : [...SIDE_NAMES].reverse();
      for (const name of order) {
        const out = execFileSync(process.execPath, [self, '--child', name, ...passOn], {
          env: { ...process.env, BENCH_SOCKET: daemon.socket, BENCH_REDIS: redis.url },
          maxBuffer: 1 << 20,
        });
        const got = JSON.parse(out.toString());
        loads += got.loads;
        for (const inflight of INFLIGHT) runs[inflight][name].push(got.results[inflight]);
      }
    }
  }
  const rows = INFLIGHT.map((inflight) => {
    const med = (name) => ({
      ops: median(runs[inflight][name].map((x) => x.ops)),
      p50: median(runs[inflight][name].map((x) => x.p50)),
      p99: median(runs[inflight][name].map((x) => x.p99)),
    });
    return { inflight, satchel: med('satchel'), local: med('satchel local'), direct: med('node-redis'), csc: med('node-redis csc') };
  });

  await daemon.stop('SIGTERM');
  await redis.stop();
  fs.rmSync(dir, { recursive: true, force: true });

  if (loads !== 0) throw new Error(`expected only hits, the loader ran ${loads} times`);

  const f0 = (x) => Math.round(x).toLocaleString('en-US');
  const f1 = (x) => x.toFixed(1);
  console.log(`getOrSet hits, ${KEYS} keys, ~200-byte values; medians of ${RUNS} runs of ${SECS} s each side`);
  console.log(
    '| in flight | node-redis ops/s | node-redis csc ops/s | satchel ops/s | satchel local ops/s | satchel / node-redis | satchel / csc | local / node-redis | local / csc | p50 µs node-redis / csc / satchel / local |',
  );
  console.log('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  const x = (a, b) => `${(a / b).toFixed(2)}x`;
  for (const r of rows) {
    console.log(
      `| ${r.inflight} | ${f0(r.direct.ops)} | ${f0(r.csc.ops)} | ${f0(r.satchel.ops)} | ${f0(r.local.ops)} | ` +
        `${x(r.satchel.ops, r.direct.ops)} | ${x(r.satchel.ops, r.csc.ops)} | ${x(r.local.ops, r.direct.ops)} | ${x(r.local.ops, r.csc.ops)} | ` +
        `${f1(r.direct.p50)} / ${f1(r.csc.p50)} / ${f1(r.satchel.p50)} / ${f1(r.local.p50)} |`,
    );
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
