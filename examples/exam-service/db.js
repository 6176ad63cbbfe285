// The service's "database": an in-memory store it owns, with query counters so tests
// (and curious readers) can see when the cache saved a query. Queries are async and
// slightly slow, like a real database.

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

export class ExamDb {
  constructor({ latencyMs = 5 } = {}) {
    this.latencyMs = latencyMs;
    this.queries = { listExams: 0, getExam: 0, listResults: 0 };
    this.exams = new Map([
      [1, { id: 1, title: 'Algebra I — final', date: '2026-12-01', published: false }],
      [2, { id: 2, title: 'Organic Chemistry — midterm', date: '2026-12-03', published: false }],
      [3, { id: 3, title: 'European History — essay', date: '2026-12-05', published: false }],
    ]);
    this.students = new Map([
      ['s1', { id: 's1', name: 'Ada', email: 'ada@students.example' }],
      ['s2', { id: 's2', name: 'Grace', email: 'grace@students.example' }],
      ['s3', { id: 's3', name: 'Edsger', email: 'edsger@students.example' }],
    ]);
    this.results = new Map(); // examId -> Map(studentId -> {score, gradedAt})
  }

  async listExams() {
    this.queries.listExams += 1;
    await delay(this.latencyMs);
    return [...this.exams.values()].map((e) => ({ ...e }));
  }

  async getExam(id) {
    this.queries.getExam += 1;
    await delay(this.latencyMs);
    const e = this.exams.get(id);
    return e ? { ...e } : null;
  }

  /** Published results only: graders' drafts are not visible to students. */
  async listResults(examId) {
    this.queries.listResults += 1;
    await delay(this.latencyMs);
    const exam = this.exams.get(examId);
    if (!exam || !exam.published) return [];
    return [...(this.results.get(examId) ?? new Map()).entries()].map(([studentId, r]) => ({
      studentId,
      name: this.students.get(studentId)?.name ?? studentId,
      score: r.score,
    }));
  }

  recordResult(examId, studentId, score) {
    if (!this.exams.has(examId)) return false;
    if (!this.students.has(studentId)) return false;
    if (!this.results.has(examId)) this.results.set(examId, new Map());
    this.results.get(examId).set(studentId, { score, gradedAt: Date.now() });
    return true;
  }

  /** Marks the exam's results published; returns the students to notify. */
  publish(examId) {
    const exam = this.exams.get(examId);
    if (!exam) return null;
    exam.published = true;
    return [...(this.results.get(examId) ?? new Map()).keys()].map((id) => this.students.get(id));
  }
}
