#!/usr/bin/env bash
# drover's bus benchmark side by side with its peer (BullMQ on the same Redis), in one run.
# Usage: bench/run-bus-bench.sh [TASKS] [WORKERS] [PAYLOAD]
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-2000}
workers=${2:-8}
payload=${3:-256}
redis=${DROVER_BENCH_REDIS:-redis://127.0.0.1:6379}
nats=${DROVER_BENCH_NATS:-nats://127.0.0.1:4222}

cargo build --release --quiet -p drover
drover=target/release/drover

echo "# drover bench bus: $tasks runs, $workers at once, $payload-byte payload, on $(nproc) cores"
for backend in embedded redis nats; do
    url=embedded
    [ "$backend" = redis ] && url=$redis
    [ "$backend" = nats ] && url=$nats
    for stages in 1 3; do
        "$drover" --json bench bus --backend "$backend" --url "$url" \
            --tasks "$tasks" --workers "$workers" --payload "$payload" --stages "$stages" --submitters 16
    done
done

echo "# peer: BullMQ on the same Redis, same workload"
(cd bench/peers/bullmq && { [ -d node_modules ] || npm install --no-audit --no-fund --silent; } \
    && node bench.mjs --tasks "$tasks" --workers "$workers" --payload "$payload" --submitters 16 --redis "$redis")
