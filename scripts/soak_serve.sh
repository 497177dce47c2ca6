#!/usr/bin/env bash
# Soak of `furnace serve` at 64 streams: `furnace bench serve` runs again and again for
# SECONDS (default 600) against one server, the server's RSS is sampled every 20 s, and a
# summary (requests, errors, RSS over time) is printed at the end.
# Usage: scripts/soak_serve.sh [FURNACE_BINARY] [SECONDS] [PORT]
set -euo pipefail
bin=${1:-target/release/furnace}
dur=${2:-600}
port=${3:-18777}
work=$(mktemp -d)
"$bin" serve --port "$port" --runs-dir "$work/runs" --max-batch 32 --max-queue 96 >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q "^serving " "$work/server.log" && break; sleep 1; done
grep -q "^serving " "$work/server.log" || { cat "$work/server.log" >&2; exit 1; }
( while kill -0 "$server" 2>/dev/null; do echo "$(date +%s) $(ps -o rss= -p "$server")" >>"$work/rss.log"; sleep 20; done ) &
start=$(date +%s)
run=0
while [ $(( $(date +%s) - start )) -lt "$dur" ]; do
    run=$((run + 1))
    "$bin" bench serve --url "http://127.0.0.1:$port" --concurrency 64 --requests 128 --prompt-tokens 64 \
        --max-tokens 32 --seed $((run * 1000)) --json >"$work/run-$run.json"
done
kill -INT "$server"
wait "$server" && status=0 || status=$?
python3 - "$work" "$run" "$(( $(date +%s) - start ))" "$status" <<'PY'
import json, sys
work, runs, secs, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
done = errors = 0
for r in range(1, runs + 1):
    m = json.load(open(f"{work}/run-{r}.json"))["median"]
    done += m["completed"]
    errors += m["errors"]
rss = [l.split() for l in open(f"{work}/rss.log")]
t0 = int(rss[0][0])
print(f"{runs} runs, {done} requests completed, {errors} errors, {secs} s; server exit status {status}")
print("RSS (s: MiB): " + " ".join(f"{int(t) - t0}:{int(k) // 1024}" for t, k in rss))
PY
