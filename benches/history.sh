#!/usr/bin/env bash
# The history benchmark: months of events in the database, and how the daemon behaves then
# (ingest rate, the operator's tools, bytes per event, latency at a steady 2k requests/s next
# to a bare axum server, memory, start-up, and pruning a backlog). See benches/history.py.
#
#   benches/history.sh                        # 2 M events in steps of 1 M, about 10 minutes
#   EVENTS=5000000 benches/history.sh         # the full figures (about 6 GB of disk)
#   EVENTS=200000 STEP=100000 PRUNE=100000 benches/history.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bin hookroute --example bench-bare --example bench-loadgen
exec python3 benches/history.py
