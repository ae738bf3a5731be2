#!/usr/bin/env bash
# Builds the Debian package (target/debian/hookroute_*.deb) with cargo-deb: the release binary,
# the unit, sysusers, tmpfiles and logrotate snippets, the man page and shell completions
# generated from the command definitions, and /etc/hookroute/config.toml, which is
# config.example.toml with its data under /var/lib/hookroute.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
cargo build --release --locked

assets=target/deb-assets
rm -rf "$assets" && mkdir -p "$assets"
bin=target/release/hookroute
# The main page and one per subcommand (the main page refers to them: hookroute-serve(1), …).
mkdir -p "$assets/man"
"$bin" man --dir "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" completions bash > "$assets/hookroute.bash"
"$bin" completions zsh > "$assets/_hookroute"
"$bin" completions fish > "$assets/hookroute.fish"
# The example's secrets are public: the packaged configuration reads each source's secret from
# a file the operator creates, so nothing verifies (and the unit does not start, saying which
# file to create) until they do.
sed -e 's|"\./data/|"/var/lib/hookroute/|' \
    -e 's|^secret = \["whsec_example_change_me"\]$|secret_file = "/etc/hookroute/secrets/compliancelayer"|' \
    -e 's|^secret = "example-scorecard-token-change-me"$|secret_file = "/etc/hookroute/secrets/scorecard"|' \
    config.example.toml > "$assets/config.toml"
if grep -q '"\./data/' "$assets/config.toml"; then
    echo "package.sh: config.toml still has a ./data/ path" >&2
    exit 1
fi
if grep -Eq 'whsec_example_change_me|example-scorecard-token-change-me' "$assets/config.toml" ||
    [ "$(grep -c '^secret_file = "/etc/hookroute/secrets/' "$assets/config.toml")" != 2 ]; then
    echo "package.sh: config.toml still ships an example secret" >&2
    exit 1
fi

cargo deb --no-build --locked "$@"
