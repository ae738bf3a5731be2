#!/usr/bin/env bash
# Checks the Debian package that systemd/package.sh built: its contents and modes, its
# conffile, that installing it creates the service user without starting anything, that the
# service user can read and check the packaged configuration, a new user's first test delivery
# through the installed daemon, and the unit's sandbox score.
# Needs root (it installs the package); .ci/run calls it after building.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(ls -t target/debian/hookroute_*.deb | head -n1)
fail() { echo "package check: $*" >&2; exit 1; }

contents=$(dpkg-deb --contents "$deb")
for entry in \
    "-rwxr-xr-x (root/root|0/0) .* ./usr/bin/hookroute" \
    "-rw-r--r-- (root/root|0/0) .* ./lib/systemd/system/hookroute.service" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/lib/sysusers.d/hookroute.conf" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/lib/tmpfiles.d/hookroute.conf" \
    "-rw-r--r-- (root/root|0/0) .* ./etc/logrotate.d/hookroute" \
    "-rw-r----- (root/root|0/0) .* ./etc/hookroute/config.toml" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/man/man1/hookroute.1.gz" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/man/man1/hookroute-serve.1.gz" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/doc/hookroute/docs/deployment.md" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/man/man1/hookroute-deliveries-list.1.gz" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/bash-completion/completions/hookroute" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/zsh/vendor-completions/_hookroute" \
    "-rw-r--r-- (root/root|0/0) .* ./usr/share/fish/vendor_completions.d/hookroute.fish"; do
    grep -Eq -- "^$entry\$" <<<"$contents" || fail "no entry like '$entry' in:
$contents"
done
dpkg-deb --info "$deb" conffiles | grep -qx /etc/hookroute/config.toml || fail "config.toml is not a conffile"
# The stripped binary: no symbol table.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb --extract "$deb" "$tmp"
if readelf --section-headers "$tmp/usr/bin/hookroute" | grep -q '\.symtab'; then
    fail "the binary is not stripped"
fi
grep -q '^ExecStart=/usr/bin/hookroute serve --config /etc/hookroute/config.toml$' \
    "$tmp/lib/systemd/system/hookroute.service" || fail "the unit does not start /usr/bin/hookroute"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst > "$tmp/postinst"
if grep -v '^[[:space:]]*#' "$tmp/postinst" |
    grep -Eq 'systemctl (start|enable|restart)|deb-systemd-invoke'; then
    fail "postinst starts or enables the service"
fi

# Installed: the user exists, the configuration is root:hookroute 0640, nothing runs, and the
# service user can check the packaged configuration.
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "./$deb" >/dev/null
getent passwd hookroute >/dev/null || fail "no hookroute user after installing"
[ "$(stat -c '%U:%G %a' /etc/hookroute/config.toml)" = "root:hookroute 640" ] ||
    fail "config.toml is $(stat -c '%U:%G %a' /etc/hookroute/config.toml)"
[ "$(stat -c '%U:%G %a' /var/lib/hookroute)" = "hookroute:hookroute 750" ] ||
    fail "/var/lib/hookroute is $(stat -c '%U:%G %a' /var/lib/hookroute)"
# Only the installed binary counts: a developer's or a test's own hookroute may be running.
for exe in /proc/[0-9]*/exe; do
    if [ "$(readlink "$exe" 2>/dev/null)" = /usr/bin/hookroute ]; then
        fail "installing started hookroute"
    fi
done
# The packaged configuration verifies nothing until the operator sets the secrets: checked
# (as the unit's ExecStartPre does) it fails, naming the file to create.
[ "$(stat -c '%U:%G %a' /etc/hookroute/secrets)" = "root:hookroute 750" ] ||
    fail "/etc/hookroute/secrets is $(stat -c '%U:%G %a' /etc/hookroute/secrets)"
as_service() { setpriv --reuid=hookroute --regid=hookroute --init-groups "$@"; }
if unset_check=$(as_service /usr/bin/hookroute check-config --config /etc/hookroute/config.toml 2>&1); then
    fail "the packaged configuration passes check-config without secrets"
fi
grep -q '/etc/hookroute/secrets/compliancelayer does not exist yet' <<<"$unset_check" ||
    fail "check-config does not say which secret file to create: $unset_check"
for name in compliancelayer scorecard; do
    install -m 0640 -g hookroute /dev/null "/etc/hookroute/secrets/$name"
    head -c 24 /dev/urandom | base64 > "/etc/hookroute/secrets/$name"
done
as_service /usr/bin/hookroute check-config --config /etc/hookroute/config.toml >/dev/null ||
    fail "the service user cannot check the packaged configuration with its secrets set"

# The first hour from the package, as README.md and docs/connect-a-sender.md tell it: with the
# secrets set, the daemon runs as the service user (as the unit runs it; there is no systemd
# here), a test delivery sent with `hookroute send` is verified and accepted, and
# `deliveries list` shows it.
sample=$tmp/scan.completed.json
cp tests/fixtures/compliancelayer-scan.completed.json "$sample"
chmod 0644 "$sample"
chmod 0755 "$tmp"
(cd /var/lib/hookroute && exec setpriv --reuid=hookroute --regid=hookroute --init-groups \
    /usr/bin/hookroute serve --config /etc/hookroute/config.toml) >"$tmp/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 1 100); do
    grep -q listening "$tmp/daemon.log" && break
    sleep 0.1
done
grep -q listening "$tmp/daemon.log" || fail "the packaged daemon did not start: $(cat "$tmp/daemon.log")"
sent=$(as_service /usr/bin/hookroute send --source compliancelayer "$sample" 2>&1) ||
    fail "the test delivery was refused: $sent"
grep -q '"status":"accepted"' <<<"$sent" || fail "the test delivery was not accepted: $sent"
for _ in $(seq 1 50); do
    grep -q 'delivery accepted' "$tmp/daemon.log" && break
    sleep 0.1
done
grep -q 'delivery accepted' "$tmp/daemon.log" || fail "the daemon did not log the delivery: $(cat "$tmp/daemon.log")"
listed=$(as_service /usr/bin/hookroute deliveries list 2>&1) || fail "deliveries list: $listed"
grep -q 'scan.completed' <<<"$listed" || fail "deliveries list does not show the test delivery: $listed"
kill "$daemon"
wait "$daemon" || fail "the packaged daemon did not stop cleanly: $(cat "$tmp/daemon.log")"
rm -f /etc/hookroute/secrets/compliancelayer /etc/hookroute/secrets/scorecard
rm -rf /var/lib/hookroute/*
man -l /usr/share/man/man1/hookroute.1.gz >/dev/null 2>&1 || zcat /usr/share/man/man1/hookroute.1.gz | grep -q '^\.TH' ||
    fail "the man page does not render"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q hookroute >/dev/null

# The unit's sandbox: systemd's own exposure score, which must stay at 2.0 or below.
exposure=$(systemd-analyze security --offline=true systemd/hookroute.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for hookroute.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "systemd-analyze gave no exposure level"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure is above 2.0"
echo "package check: $deb ok (unit exposure $exposure)"
