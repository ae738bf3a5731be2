"""The history benchmark (benches/history.sh runs it): how hookroute behaves as months of
events pile up. It fills a fresh database through the real HTTP endpoint with signed, unique,
1 KiB scanner deliveries (benches/loadgen.rs), every event routed to a file sink, and at every
STEP events reports, next to a bare axum server measured in the same run:

- ingest/s: a flood from 64 connections (median of three 5 s floods; the first step's, from
  an empty database, is the baseline);
- `deliveries list --limit 20` with each filter, and `deliveries show` of the oldest, middle
  and newest event: median of 5 runs each, the slowest filter or event reported;
- the status page (#28): each page (overview, deliveries with each filter, a type no event has
  (the scan budget spent) and the next page,
  the oldest, middle and newest event, dead letters, silences, configuration) fetched by a
  logged-in operator, median of 5 each, the slowest page reported;
- bytes on disk per stored event (database and WAL over events, jobs and attempts included);
- a steady 2,000 requests/s over 32 connections (10 s, after 5 s of it): p50 and p99 of
  hookroute and of bare axum, and the time from sending an event to its line in the file
  sink (p99);
- the start-up time to the first 202, and resident memory after the steady load on the
  restarted daemon (and, apart, the peak the floods before it reached).

Then the pruning scenario: a backlog of expired events (1 M, or half the history if smaller)
goes at the next start, while the steady load runs; reported are the slowest request during
the prune, the daemon's peak resident memory, how long it took, and the file's size before and
after.
"""

import http.client
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

BIN = "target/release"
SECRET = "whsec_bench_secret"
EVENTS = int(os.environ.get("EVENTS", "2000000"))
STEP = int(os.environ.get("STEP", "1000000"))
RATE = int(os.environ.get("RATE", "2000"))
STEADY = int(os.environ.get("STEADY_SECONDS", "10"))
PRUNE = int(os.environ.get("PRUNE", "1000000"))

work = os.environ.get("WORK") or tempfile.mkdtemp(prefix="hookroute-history-")
db = os.path.join(work, "hookroute.db")
sink = os.path.join(work, "events.jsonl")
config = os.path.join(work, "config.toml")
TOKEN = "bench-operator-token-0123456789"


def write_config(retention=None):
    """The bench config; `retention` shortens both retentions (events may not outlive ids)."""
    dedupe, events = (retention, retention) if retention else ("7d", "90d")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:0"
rate_limit = {{ enabled = false }}   # one client floods on purpose

[storage]
path = "{db}"
dedupe_retention = "{dedupe}"
event_retention = "{events}"

[sources.compliancelayer]
secret = "{SECRET}"

[sinks.archive]
type = "file"
path = "{sink}"

[[routes]]
name = "everything to the archive"
events = ["*"]
sinks = ["archive"]

[admin]
listen = "127.0.0.1:0"

[admin.users.bench]
token = {{ file = "{os.path.join(work, "operator.token")}" }}
role = "operator"
""")
    with open(os.path.join(work, "operator.token"), "w") as f:
        f.write(TOKEN)


class Server:
    """A server started from `argv`, logging to a file; `addr` once it listens."""

    def __init__(self, argv, env=None):
        self.log = open(os.path.join(work, "server.log"), "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stderr=self.log, stdout=self.log, env=env)
        self.addr = self.page = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.log.seek(0)
            log = self.log.read()
            found = re.search(r"(?<!page )listening.*?addr=([0-9.:]+)", log)
            page = re.search(r"status page listening.*?addr=([0-9.:]+)", log)
            if found and (page or "bench-bare" in argv[0]):
                self.addr = found.group(1)
                self.page = page and page.group(1)
                return
            time.sleep(0.002)
        self.log.seek(0)
        sys.exit("server did not start:\n" + self.log.read())

    def status(self, key):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # MiB
        return 0.0

    def logged(self, text):
        self.log.seek(0)
        return text in self.log.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def hookroute():
    env = dict(os.environ, RUST_LOG="warn,hookroute=info,hookroute::http::ingest=warn,hookroute::intake=warn")
    return Server([f"{BIN}/hookroute", "serve", "--config", config], env)


def load(addr, *args):
    out = subprocess.run(
        [f"{BIN}/examples/bench-loadgen", "--url", f"http://{addr}/hooks/compliancelayer",
         "--secret", SECRET, *map(str, args)],
        check=True, capture_output=True, text=True).stdout
    result = dict(kv.split("=") for kv in out.split())
    if result["failed"] != "0":
        sys.exit(f"requests failed: {out}")
    return {k: float(v) for k, v in result.items()}


def query(sql):
    """The one value `sql` reads from the database, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def stored():
    return query("SELECT max(id) FROM events") or 0


def drained():
    """Waits until no delivery is waiting (the floods leave a backlog)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for _ in range(600):
            waiting = conn.execute(
                "SELECT count(*) FROM jobs INDEXED BY jobs_open WHERE status IN ('pending', 'failed')"
            ).fetchone()[0]
            if waiting == 0:
                return
            time.sleep(0.1)
    finally:
        conn.close()


def timed(argv, runs=5):
    """Median wall time of `argv` in ms."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)
        times.append((time.monotonic() - started) * 1000)
    return statistics.median(times)


def tools(events):
    base = [f"{BIN}/hookroute", "deliveries"]
    filters = {
        "none": [], "--status succeeded": ["--status", "succeeded"], "--status pending": ["--status", "pending"],
        "--status dead": ["--status", "dead"], "--status unrouted": ["--status", "unrouted"],
        "--source": ["--source", "compliancelayer"], "--since 1h": ["--since", "1h"],
    }
    listed = {name: timed(base + ["list", "--limit", "20", "--config", config] + f) for name, f in filters.items()}
    shown = {i: timed(base + ["show", str(i), "--config", config]) for i in (1, max(1, events // 2), events)}
    return listed, shown


def pages(page_addr, events):
    """Median ms of each status page at `events` stored events, fetched as a logged-in operator
    (a keep-alive connection, as a browser's)."""
    host, port = page_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/login", body=f"token={TOKEN}",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    answer = conn.getresponse()
    answer.read()
    cookie = answer.getheader("set-cookie").split(";")[0]
    middle = max(1, events // 2)
    paths = ["/", "/deliveries", "/deliveries?status=succeeded", "/deliveries?status=dead",
             "/deliveries?source=compliancelayer", "/deliveries?since=1h", "/deliveries?type=scan.*",
             "/deliveries?type=policy.*",
             f"/deliveries?before={middle}", "/events/1", f"/events/{middle}", f"/events/{events}",
             "/dead", "/silences", "/config"]
    timings = {}
    for path in paths:
        times = []
        for _ in range(5):
            started = time.monotonic()
            conn.request("GET", path, headers={"cookie": cookie})
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                sys.exit(f"{path}: {answer.status}")
            times.append((time.monotonic() - started) * 1000)
        timings[path] = statistics.median(times)
    conn.close()
    return timings


def size():
    return sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))


def steady(addr, *tail):
    """Latency at a steady rate: after the floods' written pages are on disk and 5 s of the
    same load, so that what is measured is the steady state, not the flood's aftermath."""
    subprocess.run(["sync"], check=True)
    load(addr, "--connections", 32, "--rate", RATE, "--duration", 5)
    return load(addr, "--connections", 32, "--rate", RATE, "--duration", STEADY, *tail)


def bare_steady():
    bare = Server([f"{BIN}/examples/bench-bare"])
    try:
        return steady(bare.addr)
    finally:
        bare.stop()


def flood_rate(addr):
    rates = [load(addr, "--connections", 64, "--duration", 5)["rps"] for _ in range(3)]
    return statistics.median(rates)


def startup():
    """Restarts the daemon; ms from exec to the first 202."""
    server = hookroute()
    load(server.addr, "--connections", 1, "--requests", 1)
    return server, (time.monotonic() - server.started) * 1000


def main():
    write_config()
    rows = []
    daemon = hookroute()
    empty_rate = flood_rate(daemon.addr)
    target = 0
    while True:
        events = stored()
        if events < target:
            load(daemon.addr, "--connections", 64, "--requests", target - events, "--duration", 3600)
        drained()
        rate = flood_rate(daemon.addr) if target else empty_rate
        drained()
        events = stored()
        listed, shown = tools(events)
        paged = pages(daemon.page, events)
        bare = bare_steady()
        # Steady state is measured on a daemon that has only served the steady load: the
        # floods' peak is reported on its own.
        flood_peak = daemon.status("VmHWM")
        daemon.stop()
        daemon, started_ms = startup()
        open(sink, "w").close()  # the file sink appends to the emptied file
        ours = steady(daemon.addr, "--tail", sink)
        rss = daemon.status("VmRSS")
        rows.append(dict(
            events=events, rate=rate, ratio=rate / empty_rate, list=max(listed.values()),
            list_worst=max(listed, key=listed.get), list_none=listed["none"], show=max(shown.values()),
            page=max(paged.values()), page_worst=max(paged, key=paged.get),
            bytes=size() / events, bare_p50=bare["p50_ms"], bare_p99=bare["p99_ms"],
            p50=ours["p50_ms"], p99=ours["p99_ms"], sink_p99=ours["sink_p99_ms"], rss=rss,
            flood_peak=flood_peak, startup=started_ms))
        print_row(rows[-1], header=len(rows) == 1)
        if target >= EVENTS:
            break
        target = min(target + STEP, EVENTS)
    daemon.stop()
    prune_scenario(stored())


def print_row(r, header):
    if header:
        print("| events | ingest/s (vs empty) | list (slowest filter) | list, no filter | show (slowest) "
              "| page (slowest) | bytes/event | p50 ms (bare) | p99 ms (bare) | to sink p99 ms "
              "| RSS MiB (flood peak) | start-up ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['events']:,} | {r['rate']:,.0f} ({r['ratio']:.2f}x) | {r['list']:.0f} ms ({r['list_worst']}) "
          f"| {r['list_none']:.0f} ms | {r['show']:.0f} ms | {r['page']:.1f} ms ({r['page_worst']}) "
          f"| {r['bytes']:,.0f} "
          f"| {r['p50']:.2f} ({r['bare_p50']:.2f}) | {r['p99']:.2f} ({r['bare_p99']:.2f}) "
          f"| {r['sink_p99']:.2f} | {r['rss']:.1f} ({r['flood_peak']:.0f}) | {r['startup']:.0f} |", flush=True)


def prune_scenario(events):
    """A backlog of expired events, as after the retention was shortened: the oldest PRUNE
    events (with their delivery ids) are dated back 100 days, past the 90-day retention,
    while the daemon is stopped; at its start it prunes them under the steady load."""
    expire = min(PRUNE, events // 2)
    conn = sqlite3.connect(db)
    day = 86_400_000
    conn.execute("UPDATE events SET received_at = received_at - 100 * ? WHERE id <= ?", (day, expire))
    conn.execute("UPDATE dedupe SET seen_at = seen_at - 100 * ? WHERE event_id <= ?", (day, expire))
    conn.commit()
    conn.close()
    subprocess.run(["sync"], check=True)
    before = size()
    daemon = hookroute()
    started = time.monotonic()
    windows = []

    def window(phase):
        at = time.monotonic() - started
        windows.append(load(daemon.addr, "--connections", 32, "--rate", RATE, "--duration", 5))
        windows[-1].update(phase=phase, at=at)
        if os.environ.get("VERBOSE"):
            print(f"  {at:6.1f} s {phase:8} p99 {windows[-1]['p99_ms']:7.2f} ms, "
                  f"slowest {windows[-1]['max_ms']:7.1f} ms", flush=True)

    while not daemon.logged("pruned expired records what=Events"):
        window("ids" if not daemon.logged("what=Dedupe") else "events")
        if time.monotonic() - started > 1800:
            sys.exit("pruning took more than 30 minutes")
    pruned_after = time.monotonic() - started
    # Then the freed space goes back to the file system, in steps as paced: a minute of it.
    free_before = free_pages()
    for _ in range(12):
        window("reclaim")
    returned = (free_before - free_pages()) * 4096
    peak = daemon.status("VmHWM")
    daemon.stop()
    daemon.log.seek(0)
    pruned = int(re.search(r"what=Events pruned=(\d+)", daemon.log.read()).group(1))
    worst = max(windows, key=lambda w: w["max_ms"])
    print()
    print(f"pruning {pruned:,} expired events (of {events:,}) under a steady {RATE:,} requests/s: "
          f"done in {pruned_after:.0f} s, then {returned / 2**20:,.0f} MiB returned to the file system in "
          f"the next 60 s; slowest request {worst['max_ms']:.1f} ms ({worst['phase']}, "
          f"{worst['at']:.0f} s in), "
          f"p99 {max(w['p99_ms'] for w in windows):.2f} ms (worst 5 s window), "
          f"{statistics.median(w['p99_ms'] for w in windows):.2f} ms (median window); "
          f"peak RSS {peak:.1f} MiB; file {before / 2**20:,.0f} MiB before, {size() / 2**20:,.0f} MiB after")


def free_pages():
    return query("PRAGMA freelist_count")


if __name__ == "__main__":
    try:
        main()
    finally:
        if not os.environ.get("WORK"):
            subprocess.run(["rm", "-rf", work])
