#!/usr/bin/env bash
# The benchmarks. Ingest: signed 1 KiB ComplianceLayer deliveries with unique ids, flooded at
# hookroute (signature check, dedupe, fsync'd group commit; then again with every event routed
# to a file sink) and, alternately in the same run with the same load generator, at a bare
# axum "200 OK" server. The machine is noisy, so it runs several rounds and reports each ratio
# and their median; it also checks that every 2xx hookroute gave is really in its database. Routing: the time to evaluate a
# 200-route table against a one-route table (benches/rules.rs).
#
#   benches/ingest.sh                                  # 3 rounds of 10 s, 64 connections
#   ROUNDS=5 DURATION=20 CONNECTIONS=128 benches/ingest.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
SECRET=whsec_bench_secret

cargo build --release --locked --quiet --bin hookroute --example bench-bare --example bench-loadgen --example bench-rules
bin=target/release
work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Echoes the address a server logged to $1 once it is listening.
address() {
    for _ in $(seq 100); do
        addr=$(sed -n 's/.*listening.*addr=\([0-9.:]*\).*/\1/p' "$1" | head -n1)
        if [ -n "$addr" ]; then echo "$addr"; return; fi
        sleep 0.1
    done
    echo "server did not start:" >&2; cat "$1" >&2; exit 1
}

load() {
    "$bin/examples/bench-loadgen" --url "http://$1/hooks/compliancelayer" --secret "$SECRET" \
        --connections "$CONNECTIONS" --duration "$DURATION"
}

field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$2"; }

# hookroute runs twice per round: "ingest" has no route, so each delivery is verified, deduped,
# stored with no job (the ingest path alone); "+delivery" also routes every event
# to a file sink, so a job is stored with each event, and jobs are delivered and their outcomes
# recorded while the flood goes on.
run_hookroute() { # $1 = variant; prints the load line
    rm -rf "$work/db" && mkdir "$work/db"   # a fresh database, so every run starts alike
    cat >"$work/config.toml" <<TOML
[server]
listen = "127.0.0.1:0"
rate_limit = { enabled = false }   # one client floods on purpose

[storage]
path = "$work/db/hookroute.db"

[sources.compliancelayer]
secret = "$SECRET"

[sinks.archive]
type = "file"
path = "$work/db/events.jsonl"
TOML
    if [ "$1" = "+delivery" ]; then
        printf '\n[[routes]]\nname = "everything to the archive"\nevents = ["*"]\nsinks = ["archive"]\n' >>"$work/config.toml"
    fi
    # Every log line but the ones per event (accepted, unrouted): at a flood's rate they are
    # the logger's cost, not the ingest path's (benches/README.md measures them on their own).
    RUST_LOG=warn,hookroute=info,hookroute::http::ingest=warn,hookroute::intake=warn \
        "$bin/hookroute" serve --config "$work/config.toml" 2>"$work/hookroute.log" &
    pid=$!
    load "$(address "$work/hookroute.log")"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

printf '%-6s %-10s %12s %9s %9s\n' round server "requests/s" "p50 ms" "p99 ms"
ratios_ingest=()
ratios_delivery=()
for round in $(seq "$ROUNDS"); do
    "$bin/examples/bench-bare" >"$work/bare.log" 2>&1 &
    pid=$!
    bare=$(load "$(address "$work/bare.log")")
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    printf '%-6s %-10s %12s %9s %9s\n' "$round" "bare axum" "$(field rps "$bare")" "$(field p50_ms "$bare")" "$(field p99_ms "$bare")"

    for variant in ingest +delivery; do
        hr=$(run_hookroute "$variant")
        stored=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from events').fetchone()[0])" "$work/db/hookroute.db")
        accepted=$(field ok "$hr")
        if [ "$(field failed "$hr")" != 0 ]; then echo "hookroute answered non-2xx: $hr" >&2; exit 1; fi
        if [ "$stored" != "$accepted" ]; then
            echo "FAIL: $accepted deliveries acknowledged, only $stored stored" >&2; exit 1
        fi
        delivered=0
        if [ -f "$work/db/events.jsonl" ]; then delivered=$(wc -l <"$work/db/events.jsonl"); fi
        printf '%-6s %-10s %12s %9s %9s   %s acknowledged, %s stored, %s delivered\n' "$round" "$variant" \
            "$(field rps "$hr")" "$(field p50_ms "$hr")" "$(field p99_ms "$hr")" "$accepted" "$stored" "$delivered"
        ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$(field rps "$hr")" "$(field rps "$bare")")
        if [ "$variant" = ingest ]; then ratios_ingest+=("$ratio"); else ratios_delivery+=("$ratio"); fi
    done
done
python3 - "${ratios_ingest[*]}" "${ratios_delivery[*]}" <<'PY'
import statistics, sys
# The ingest path's target (issue #2); +delivery's floor, below which a change is a regression.
for name, arg, floor in (("ingest", sys.argv[1], "target >= 0.30x"),
                         ("+delivery", sys.argv[2], "guard >= 0.25x")):
    ratios = [float(r) for r in arg.split()]
    print(f"{name:>9} / bare: " + " ".join(f"{r:.2f}x" for r in ratios)
          + f"   median {statistics.median(ratios):.2f}x ({floor})")
print("every 2xx was durable")
PY

echo
"$bin/examples/bench-rules"
