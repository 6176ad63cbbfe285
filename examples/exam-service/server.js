// exam-service: an online-examination backend on node's own http module. Reads go
// through satchel's getOrSet with tags; publishing results invalidates those tags and
// queues one "results published" mail per student with an idempotency key.
//
// Before satchel this service had a Redis cache service (GET/SET, KEYS-pattern delete)
// and a BullMQ email queue with a direct-send fallback; MIGRATING.md at the repository
// root maps each piece.

import http from 'node:http';
import { pathToFileURL } from 'node:url';
import { SatchelClient, SatchelError } from 'satchel-client';
import { ExamDb } from './db.js';

const TTL = { exams: 5 * 60_000, results: 60_000 };

// The cache keys and tags of this service, in one place.
const keys = {
  examList: 'exams:list',
  exam: (id) => `exams:${id}`,
  results: (id) => `exams:${id}:results`,
};
const tags = {
  exams: 'exams',
  exam: (id) => `exam:${id}`,
};

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function readJson(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 64 * 1024) throw new HttpError(413, 'body too large');
    chunks.push(c);
  }
  if (chunks.length === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new HttpError(400, 'body is not JSON');
  }
}

function send(res, status, body) {
  const json = JSON.stringify(body, (_, v) => (typeof v === 'bigint' ? Number(v) : v));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
  res.end(json);
}

/**
 * @param {{satchel: SatchelClient, db?: ExamDb, mailFrom?: string, log?: (msg: string) => void}} deps
 */
export function createExamService({ satchel, db = new ExamDb(), mailFrom = 'exams@school.example', log = console.warn }) {
  // What the service knows about mail delivery, reported by /health and publish.
  const mail = { status: 'unknown', reason: null, outbox: [] };

  function mailDegraded(err) {
    const reason =
      err.code === 'UNKNOWN_OP'
        ? 'the satchel daemon does not offer mail.send (UNKNOWN_OP): upgrade the daemon; mails are kept in the outbox'
        : `mail.send failed with ${err.code}: ${err.message}; mails are kept in the outbox`;
    if (mail.status !== 'degraded' || mail.reason !== reason) log(`exam-service: mail degraded: ${reason}`);
    mail.status = 'degraded';
    mail.reason = reason;
  }

  async function queueResultsMail(exam, student) {
    const message = {
      to: student.email,
      from: mailFrom,
      subject: `Results published: ${exam.title}`,
      text: `Hello ${student.name},\n\nthe results of "${exam.title}" are published. See the exam portal.\n`,
      // One mail per student and exam, however often publish is retried.
      idempotencyKey: `results-published:${exam.id}:${student.id}`,
    };
    try {
      const r = await satchel.mail.send(message);
      mail.status = 'ok';
      mail.reason = null;
      return { student: student.id, mailId: r.mailId, status: r.status, duplicate: r.duplicate };
    } catch (err) {
      if (!(err instanceof SatchelError) || err.code === 'INVALID_MAIL' || err.code === 'BAD_REQUEST') throw err;
      mailDegraded(err);
      mail.outbox.push(message);
      return { student: student.id, status: 'not queued', error: err.code };
    }
  }

  // Mails kept while mail was degraded go out once it works again; their idempotency
  // keys make a repeat harmless.
  async function flushOutbox() {
    while (mail.outbox.length > 0) {
      try {
        await satchel.mail.send(mail.outbox[0]);
      } catch (err) {
        if (err instanceof SatchelError && (err.code === 'INVALID_MAIL' || err.code === 'BAD_REQUEST')) {
          log(`exam-service: dropping an outbox mail the daemon rejects: ${err.message}`);
        } else {
          return;
        }
      }
      mail.outbox.shift();
    }
    mail.status = 'ok';
    mail.reason = null;
  }

  const examId = (s) => {
    const id = Number(s);
    if (!Number.isInteger(id) || id <= 0) throw new HttpError(400, 'exam id must be a positive integer');
    return id;
  };

  async function route(req, res) {
    const url = new URL(req.url, 'http://localhost');
    const parts = url.pathname.split('/').filter(Boolean);
    const m = req.method;

    if (m === 'GET' && url.pathname === '/health') {
      let cache = 'ok';
      try {
        await satchel.health();
      } catch (err) {
        cache = `unavailable (${err.code ?? err.message})`;
      }
      let mailOp = false;
      try {
        mailOp = await satchel.supports('mail.send');
      } catch {
        // reported through cache above
      }
      if (!mailOp && mail.status !== 'degraded') {
        mail.status = 'degraded';
        mail.reason = 'the satchel daemon does not offer mail.send: upgrade the daemon; mails are kept in the outbox';
      }
      const degraded = cache !== 'ok' || mail.status === 'degraded';
      return send(res, degraded ? 503 : 200, {
        status: degraded ? 'degraded' : 'ok',
        cache,
        mail: { status: mail.status === 'unknown' ? 'ok' : mail.status, reason: mail.reason, outbox: mail.outbox.length },
        db: db.queries,
      });
    }

    if (m === 'GET' && url.pathname === '/exams') {
      const exams = await satchel.cache.getOrSet(keys.examList, () => db.listExams(), {
        ttlMs: TTL.exams,
        tags: [tags.exams],
      });
      return send(res, 200, exams);
    }

    if (parts[0] === 'exams' && parts.length >= 2) {
      const id = examId(parts[1]);

      if (m === 'GET' && parts.length === 2) {
        const exam = await satchel.cache.getOrSet(keys.exam(id), () => db.getExam(id), {
          ttlMs: TTL.exams,
          tags: [tags.exams, tags.exam(id)],
        });
        if (!exam) throw new HttpError(404, `no exam ${id}`);
        return send(res, 200, exam);
      }

      if (m === 'GET' && parts[2] === 'results' && parts.length === 3) {
        const results = await satchel.cache.getOrSet(keys.results(id), () => db.listResults(id), {
          ttlMs: TTL.results,
          tags: [tags.exam(id)],
        });
        return send(res, 200, results);
      }

      if (m === 'POST' && parts[2] === 'results' && parts.length === 3) {
        const body = await readJson(req);
        if (typeof body.studentId !== 'string' || typeof body.score !== 'number') {
          throw new HttpError(400, 'expected {"studentId": string, "score": number}');
        }
        if (!db.recordResult(id, body.studentId, body.score)) throw new HttpError(404, 'no such exam or student');
        // A draft: students cannot see it until publish, so no cache entry changes.
        return send(res, 201, { recorded: true });
      }

      if (m === 'POST' && parts[2] === 'publish' && parts.length === 3) {
        const students = db.publish(id);
        if (!students) throw new HttpError(404, `no exam ${id}`);
        if (mail.outbox.length > 0) await flushOutbox();
        const exam = await db.getExam(id);
        // Everything that shows this exam: its entry, its results and the list.
        const invalidated = await satchel.cache.invalidate({ tags: [tags.exam(id), tags.exams] });
        const mails = await Promise.all(students.map((s) => queueResultsMail(exam, s)));
        const queued = mails.filter((x) => x.mailId).length;
        return send(res, 200, {
          published: true,
          invalidated,
          mail: {
            status: queued === mails.length ? 'queued' : 'degraded',
            reason: queued === mails.length ? null : mail.reason,
            mails,
          },
        });
      }
    }
    throw new HttpError(404, 'not found');
  }

  const server = http.createServer((req, res) => {
    route(req, res).catch((err) => {
      if (err instanceof HttpError) return send(res, err.status, { error: err.message });
      if (err instanceof SatchelError) {
        return send(res, 503, { error: `cache or mail backend: ${err.code}`, retryAfterMs: err.retryAfterMs });
      }
      log(`exam-service: ${err.stack}`);
      send(res, 500, { error: 'internal error' });
    });
  });
  server.mailState = mail;
  server.flushOutbox = flushOutbox;
  return server;
}

// Run directly: `node server.js` (PORT, SATCHEL_SOCKET from the environment).
if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const satchel = new SatchelClient({ clientName: 'exam-service' });
  const server = createExamService({ satchel });
  const port = Number(process.env.PORT ?? 3000);
  server.listen(port, () => console.log(`exam-service listening on :${server.address().port}`));

  // Graceful shutdown: stop accepting, let in-flight requests finish, then close the
  // satchel connection. Mails already accepted by satchel are durable in its queue, so
  // there is no worker to drain here (BullMQ needed worker.close() and queue.close()).
  let stopping = false;
  const stop = (sig) => {
    if (stopping) process.exit(1);
    stopping = true;
    console.log(`exam-service: ${sig}, finishing in-flight requests`);
    server.close(() => {
      satchel.close();
      process.exit(0);
    });
    server.closeIdleConnections();
    setTimeout(() => process.exit(1), 10_000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
