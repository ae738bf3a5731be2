#!/usr/bin/env bash
# A new user's first hour, from a fresh clone: clones this repository into an empty directory
# and runs README.md's quick start there, command for command (read from README.md itself, so
# the walk follows the README as it is), checking that each does what the README says: the
# daemon serves the shipped example, a signed sample is accepted (202) and then recognised as a
# duplicate (200), the event is archived and its message logged, and check-config, route-test
# and deliveries list answer. .ci/run calls it; the walk from the Debian package is in
# tests/package.sh. CONTRIBUTING.md has both as a checklist.
#
# The clone shares this checkout's target directory, so only hookroute itself is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
fail() { echo "walkthrough: $*" >&2; exit 1; }

# The quick start's shell blocks, one command per line (continuations joined, comments cut).
mapfile -t commands < <(python3 - README.md <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
for block in re.findall(r"```sh\n(.*?)```", section, re.S):
    for command in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", command).strip()
        if command:
            print(re.sub(r"\s+", " ", command))
EOF
)
[ "${#commands[@]}" -eq 5 ] || fail "expected 5 quick-start commands in README.md, found ${#commands[@]}: ${commands[*]}"
case "${commands[0]}" in *" serve "*) ;; *) fail "the first command does not serve: ${commands[0]}" ;; esac

work=$(mktemp -d)
daemon=
cleanup() {
    # The whole group: cargo, and the daemon it runs.
    if [ -n "$daemon" ]; then kill -- "-$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
git clone --quiet "$repo" "$work/hookroute"
cd "$work/hookroute"
export CARGO_TARGET_DIR="$repo/target"

# 1. Build and serve the example, in the background (a process group of its own), until it
# listens: the build may take minutes on a small machine.
setsid bash -c "${commands[0]}" >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 1 2400); do
    if grep -q "listening" "$work/daemon.log" 2>/dev/null; then break; fi
    kill -0 "$daemon" 2>/dev/null || fail "the daemon exited: $(cat "$work/daemon.log")"
    sleep 0.5
done
grep -q "listening" "$work/daemon.log" || fail "the daemon did not listen within 20 minutes"

# 2. The signed sample: accepted, then a duplicate.
first=$(bash -c "${commands[1]}" 2>&1) || fail "send failed: $first"
grep -q '202' <<<"$first" && grep -q '"status":"accepted"' <<<"$first" ||
    fail "the first send was not accepted (202): $first"
again=$(bash -c "${commands[1]}" 2>&1) || fail "the second send failed: $again"
grep -q '200' <<<"$again" && grep -q '"status":"duplicate"' <<<"$again" ||
    fail "the second send was not a duplicate (200): $again"
# Archived, and its message logged by the example's route.
for _ in $(seq 1 50); do
    if [ -s data/events.jsonl ] && grep -q 'Alert \[HIGH\]' "$work/daemon.log"; then break; fi
    sleep 0.2
done
[ "$(wc -l <data/events.jsonl)" -eq 1 ] || fail "data/events.jsonl has not exactly one event"
grep -q 'Alert \[HIGH\] example.com' "$work/daemon.log" ||
    fail "the alert's message is not in the daemon's log: $(cat "$work/daemon.log")"

# 3. What the daemon will do, which routes, what happened.
checked=$(bash -c "${commands[2]}" 2>&1) || fail "check-config failed: $checked"
grep -q '^configuration OK' <<<"$checked" || fail "check-config: $checked"
routed=$(bash -c "${commands[3]}" 2>&1) || fail "route-test failed: $routed"
grep -q 'everything to the archive": MATCHED' <<<"$routed" || fail "route-test: $routed"
listed=$(bash -c "${commands[4]}" 2>&1) || fail "deliveries list failed: $listed"
grep -q 'alert.triggered .* archive .* succeeded' <<<"$listed" || fail "deliveries list: $listed"
grep -q 'alert.triggered .* console .* succeeded' <<<"$listed" || fail "deliveries list: $listed"
echo "walkthrough: README.md's quick start works from a fresh clone"
