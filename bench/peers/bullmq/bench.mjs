// The peer of `drover bench bus --backend redis`: N no-op jobs through BullMQ on the same
// Redis, K at once, each carrying PAYLOAD bytes, added by S concurrent submitters like
// drover's runs.
// Instants come from one monotonic clock in this process: enqueue when `queue.add`
// resolved (the job is in Redis), start when the processor begins, commit when the
// worker reports the job completed.
//
//   node bench.mjs --tasks 2000 --workers 8 --payload 256 --submitters 16 --redis redis://127.0.0.1:6379

import { performance } from 'node:perf_hooks';
import { Queue, Worker } from 'bullmq';

function arg(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 ? process.argv[at + 1] : fallback;
}

const tasks = Number(arg('tasks', 1000));
const workers = Number(arg('workers', 8));
const payload = 'x'.repeat(Number(arg('payload', 256)));
const submitters = Number(arg('submitters', 16));
const redis = new URL(arg('redis', 'redis://127.0.0.1:6379'));
const connection = { host: redis.hostname, port: Number(redis.port || 6379), maxRetriesPerRequest: null };
const queueName = `drover-peer-${process.pid}`;

const enqueued = new Map();
const dispatch = [];
const overhead = [];
const queue = new Queue(queueName, { connection });
let completed = 0;
let finish;
const allDone = new Promise((resolve) => { finish = resolve; });

const worker = new Worker(
  queueName,
  async (job) => {
    const start = performance.now();
    const at = enqueued.get(job.id);
    if (at !== undefined) dispatch.push(start - at);
    return null;
  },
  { connection, concurrency: workers },
);
worker.on('completed', (job) => {
  const at = enqueued.get(job.id);
  if (at !== undefined) overhead.push(performance.now() - at);
  completed += 1;
  if (completed === tasks) finish();
});
await worker.waitUntilReady();

const started = performance.now();
let next = 0;
async function submitter() {
  while (next < tasks) {
    next += 1;
    const job = await queue.add('noop', { payload }, { removeOnComplete: true, removeOnFail: true });
    enqueued.set(job.id, performance.now());
  }
}
await Promise.all(Array.from({ length: submitters }, submitter));
const submitSeconds = (performance.now() - started) / 1000;
await allDone;
const wall = (performance.now() - started) / 1000;

const percentile = (values, q) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.round((sorted.length - 1) * q))];
};
const report = {
  backend: 'bullmq',
  runs: tasks,
  workers,
  payload_bytes: payload.length,
  submitters,
  wall_seconds: wall,
  submit_seconds: submitSeconds,
  runs_per_second: tasks / wall,
  dispatch_p50_ms: percentile(dispatch, 0.5),
  dispatch_p99_ms: percentile(dispatch, 0.99),
  stage_overhead_p50_ms: percentile(overhead, 0.5),
  stage_overhead_p99_ms: percentile(overhead, 0.99),
};
console.log(JSON.stringify(report, null, 2));

await worker.close();
await queue.obliterate({ force: true });
await queue.close();
