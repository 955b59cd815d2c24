#!/usr/bin/env bash
# Jobs per minute through `fluxfit serve --broker` with 1, 2, 3 … `fluxfit worker`s on this
# machine, on the built-in tiny model: a fresh redis-server, server and workers per row, the
# same jobs submitted at once by concurrent clients, timed from the first submission to the
# last result. The row `alone` is `fluxfit serve` with its own model and no broker: the same
# work without the broker's cost.
#
#   tools/bench-workers.sh [--workers alone,1,2,3] [--jobs 60] [--size 256] [--steps 4]
#                          [--threads N] [--bin target/release/fluxfit]
#
# --threads gives each worker N compute threads (default: every core, as `fluxfit worker`
# does alone). Needs redis-server and curl. On one machine the workers share its cores, so
# the figure shows the broker's overhead and the CPU's limit, not what N GPUs give.
set -euo pipefail

workers=alone,1,2,3 jobs=60 size=256 steps=4 threads="" bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "bench-workers: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$bin" ]; then
  cargo build -q --release -p fluxfit-cli --manifest-path "$root/Cargo.toml"
  bin="$root/target/release/fluxfit"
fi
command -v redis-server >/dev/null || { echo "bench-workers: redis-server is not installed" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

metric() { curl -s "$1/metrics" | awk -v m="$2" 'index($0, m " ") == 1 { print $2 }'; }

printf '| workers | jobs | seconds | jobs/min | vs the first row |\n|---|---|---|---|---|\n'
base_rate=""
IFS=, read -ra counts <<<"$workers"
for n in "${counts[@]}"; do
  dir="$tmp/run-$n"; mkdir -p "$dir"
  redis-server --port 0 --unixsocket "$dir/r.sock" --save "" --appendonly yes --dir "$dir" \
    >/dev/null 2>&1 & pids+=($!)
  for _ in $(seq 100); do [ -S "$dir/r.sock" ] && break; sleep 0.05; done
  url="redis+unix://$dir/r.sock"
  if [ "$n" = alone ]; then
    "$bin" ${threads:+--threads "$threads"} serve --model tiny --listen 127.0.0.1:0 \
      --queue 1000 --preview-every 0 --output-dir "$dir/out" 2>"$dir/serve.log" & pids+=($!)
  else
    "$bin" serve --broker "$url" --listen 127.0.0.1:0 --queue 1000 --preview-every 0 \
      --output-dir "$dir/out" 2>"$dir/serve.log" & pids+=($!)
  fi
  for _ in $(seq 200); do grep -q "on http://" "$dir/serve.log" 2>/dev/null && break; sleep 0.05; done
  base="http://$(sed -n 's/.* on http:\/\/\([^ ]*\).*/\1/p' "$dir/serve.log" | head -1)"
  if [ "$n" != alone ]; then
    for w in $(seq "$n"); do
      "$bin" ${threads:+--threads "$threads"} worker --broker "$url" --model tiny --name "w$w" \
        --preview-every 0 2>"$dir/w$w.log" & pids+=($!)
    done
    for _ in $(seq 600); do
      [ "$(metric "$base" fluxfit_broker_up)" = 1 ] &&
        [ "$(curl -s "$base/metrics" | grep -c '^fluxfit_worker_up.* 1$')" = "$n" ] && break
      sleep 0.1
    done
  fi
  start=$(date +%s.%N)
  seq "$jobs" | xargs -P 8 -I{} curl -s -o /dev/null -X POST "$base/v1/jobs" \
    -d "{\"prompt\":\"job {}\",\"width\":$size,\"height\":$size,\"steps\":$steps,\"seed\":{}}"
  while [ "$(metric "$base" 'fluxfit_jobs_total{outcome="done"}')" != "$jobs" ]; do sleep 0.05; done
  end=$(date +%s.%N)
  read -r secs rate < <(awk -v s="$start" -v e="$end" -v j="$jobs" 'BEGIN { d = e - s; printf "%.1f %.1f\n", d, j / d * 60 }')
  [ -z "$base_rate" ] && base_rate=$rate
  vs=$(awk -v r="$rate" -v b="$base_rate" 'BEGIN { printf "%.2f×", r / b }')
  printf '| %s | %s | %s | %s | %s |\n' "$n" "$jobs" "$secs" "$rate" "$vs"
  for p in "${pids[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  pids=()
done
