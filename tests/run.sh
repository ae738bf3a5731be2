#!/usr/bin/env bash
# Installs what the tests need on a Debian machine, then runs them: the one test command the
# README gives, and what CI (.ci/run) calls.
#
# The integration tests use mkfifo (coreutils), kill and pkill (procps) to drive the daemon,
# a real SMTP server (aiosmtpd) and a real Prometheus parser (prometheus_client), both run by
# Debian's own python3, and PostgreSQL's server programs (initdb, postgres, psql).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mkfifo >/dev/null 2>&1 || missing+=(coreutils)
command -v pkill >/dev/null 2>&1 || missing+=(procps)
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || missing+=(python3-aiosmtpd)
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || missing+=(python3-prometheus-client)
# The PostgreSQL backend's tests start a throwaway server of their own (tests/it/postgres.rs).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

cargo test --locked "$@"
