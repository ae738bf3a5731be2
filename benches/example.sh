#!/usr/bin/env bash
# The example-configuration benchmark: hookroute on the shipped config.example.toml at a steady
# 2,000 signed deliveries/s next to a bare axum server (and with parts of the example taken
# away, to see where the time goes), its full-load rate against Debian's adnanh/webhook, and
# its memory after a flood. See benches/example.py. `webhook` comes from `apt-get install
# webhook`; without it that comparison is left out.
#
#   benches/example.sh                           # 3 rounds
#   ROUNDS=5 RATE=2000 STEADY=20 benches/example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bin hookroute --example bench-bare --example bench-loadgen
exec python3 benches/example.py
