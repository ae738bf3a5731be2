#!/usr/bin/env bash
# The replicas benchmark: one and two hookroute daemons on one local PostgreSQL, next to the
# SQLite backend in the same run, under the signed flood of benches/ingest.sh with a file sink:
# durable deliveries/s, p99, and where the CPU goes. See benches/replicas.py. Needs Debian's
# postgresql package (tests/run.sh installs it).
#
#   benches/replicas.sh                          # 3 rounds of 10 s floods, 64 connections
#   ROUNDS=5 DURATION=20 benches/replicas.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bin hookroute --example bench-loadgen
exec python3 benches/replicas.py
