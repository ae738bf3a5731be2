#!/usr/bin/env bash
# Installs what the tests need on a Debian machine, then runs them: the one test command the
# README gives, and what CI (.ci/run) calls.
#
# The integration tests use mkfifo (coreutils), kill and pkill (procps) to drive the daemon,
# a real SMTP server (aiosmtpd) and a real Prometheus parser (prometheus_client), both run by
# Debian's own python3, PostgreSQL's server programs (initdb, postgres, psql), and promtool
# (Debian's prometheus) to check the metrics and test the documented alert rules, and Chromium
# with chromedriver to click through the status page as a person would.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mkfifo >/dev/null 2>&1 || missing+=(coreutils)
command -v pkill >/dev/null 2>&1 || missing+=(procps)
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || missing+=(python3-aiosmtpd)
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || missing+=(python3-prometheus-client)
# The PostgreSQL backend's tests start a throwaway server of their own (tests/it/postgres.rs).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
# The status page's tests drive Debian's headless Chromium through chromedriver (tests/it/browser.rs).
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)
# Only promtool is wanted of prometheus: not the exporters it recommends.
lean=()
command -v promtool >/dev/null 2>&1 || lean+=(prometheus)
if [ ${#missing[@]} -gt 0 ] || [ ${#lean[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q)
    "${sudo[@]}" apt-get update -q
    if [ ${#missing[@]} -gt 0 ]; then "${install[@]}" "${missing[@]}"; fi
    if [ ${#lean[@]} -gt 0 ]; then "${install[@]}" --no-install-recommends "${lean[@]}"; fi
fi

cargo test --locked "$@"
