#!/usr/bin/env bash
# Ingest benchmark: signed 1 KiB ComplianceLayer deliveries with unique ids, flooded at
# hookroute (signature check, dedupe, fsync'd group commit, file sink) and, in the same run
# with the same load generator, at a bare axum "200 OK" server. Reports both side by side and
# the ratio, then checks that every 2xx hookroute gave is really in its database.
#
#   benches/ingest.sh                      # 10 s per server, 64 connections
#   DURATION=30 CONNECTIONS=128 benches/ingest.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
SECRET=whsec_bench_secret

cargo build --release --locked --quiet --bin hookroute --example bench-bare --example bench-loadgen
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Echoes the address a server logged to $1 once it is listening.
address() {
    local log=$1
    for _ in $(seq 100); do
        addr=$(sed -n 's/.*listening.*addr=\([0-9.:]*\).*/\1/p' "$log" | head -n1)
        if [ -n "$addr" ]; then echo "$addr"; return; fi
        sleep 0.1
    done
    echo "server did not start:" >&2; cat "$log" >&2; exit 1
}

load() {
    "$bin/examples/bench-loadgen" --url "$1" --secret "$SECRET" \
        --connections "$CONNECTIONS" --duration "$DURATION"
}

field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$2"; }

cat >"$work/config.toml" <<TOML
[server]
listen = "127.0.0.1:0"
rate_limit = { enabled = false }

[storage]
path = "$work/hookroute.db"

[sources.compliancelayer]
secret = "$SECRET"

[sinks.archive]
type = "file"
path = "$work/events.jsonl"
TOML

echo "bare axum 200 OK: ${CONNECTIONS} connections, ${DURATION}s" >&2
"$bin/examples/bench-bare" >"$work/bare.log" 2>&1 &
pids+=($!)
bare_addr=$(address "$work/bare.log")
bare=$(load "http://$bare_addr/hooks/compliancelayer")
kill "${pids[0]}"

echo "hookroute: ${CONNECTIONS} connections, ${DURATION}s" >&2
RUST_LOG=${HOOKROUTE_LOG:-info} "$bin/hookroute" serve --config "$work/config.toml" 2>"$work/hookroute.log" &
pids+=($!)
hr_addr=$(address "$work/hookroute.log")
hr=$(load "http://$hr_addr/hooks/compliancelayer")
kill -TERM "${pids[1]}"
wait "${pids[1]}" 2>/dev/null || true

stored=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from events').fetchone()[0])" "$work/hookroute.db")
accepted=$(field ok "$hr")

printf '%-12s %12s %10s %10s\n' server "requests/s" "p50 ms" "p99 ms"
printf '%-12s %12s %10s %10s\n' "bare axum" "$(field rps "$bare")" "$(field p50_ms "$bare")" "$(field p99_ms "$bare")"
printf '%-12s %12s %10s %10s\n' hookroute "$(field rps "$hr")" "$(field p50_ms "$hr")" "$(field p99_ms "$hr")"
python3 - "$(field rps "$hr")" "$(field rps "$bare")" <<'PY'
import sys
hr, bare = map(float, sys.argv[1:3])
print(f"ratio hookroute/bare: {hr / bare:.2f}x (target >= 0.30x)")
PY
echo "durability: $accepted deliveries answered 2xx, $stored stored"
if [ "$(field failed "$hr")" != 0 ]; then echo "hookroute answered non-2xx: $hr" >&2; exit 1; fi
if [ "$stored" != "$accepted" ]; then echo "FAIL: acknowledged deliveries missing from the database" >&2; exit 1; fi
