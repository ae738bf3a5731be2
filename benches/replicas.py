"""The replicas benchmark (benches/replicas.sh runs it): hookroute on PostgreSQL, one daemon and
two on one database, next to the SQLite backend, in the same run. Each variant gets a fresh
database and the same signed flood as benches/ingest.sh (unique 1 KiB scanner deliveries over
64 connections), every event routed to a file sink; with two daemons the connections are
spread over both, as a load balancer would.

For each it reports:
- acked/s, p50, p99: the 2xx answers (each one a committed, durable event) during the flood;
- delivered/s: the acknowledged events over the time from the flood's start until the last of
  them was in a sink's file (so a backlog left behind counts against it);
- where the time went, in CPU milliseconds per 1,000 events: the daemons, PostgreSQL (every
  server process) and the load generator, against the two cores' wall time;
- on PostgreSQL, commits per WAL flush (how many requests one disk flush carried).

It checks that every 2xx is stored once and delivered exactly once. The machine is noisy: it
runs ROUNDS rounds and gives each ratio against SQLite in the same round, and their median.
"""

import glob
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

BIN = "target/release"
SECRET = "whsec_bench_secret"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
USER = "hookroute"
PASSWORD = "bench-password-not-a-secret"
NOBODY = 65534
TICKS = os.sysconf("SC_CLK_TCK")

work = tempfile.mkdtemp(prefix="hookroute-replicas-")
as_root = os.getuid() == 0
if as_root:
    os.chown(work, NOBODY, NOBODY)


def as_nobody():
    """PostgreSQL refuses to run as root: drop to nobody first (when root)."""
    if as_root:
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL server in `work`: fsync and synchronous_commit on, as deployed."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = os.path.dirname(found[-1])
        self.data = os.path.join(work, "pg")
        self.password_file = os.path.join(work, "password")
        with open(self.password_file, "w") as f:
            f.write(PASSWORD + "\n")
        os.chmod(self.password_file, 0o644)
        subprocess.run(
            [f"{self.bin}/initdb", "-D", self.data, "-U", USER, "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={self.password_file}", "-E", "UTF8",
             "--no-locale", "--no-instructions"],
            check=True, stdout=subprocess.DEVNULL, preexec_fn=as_nobody)
        self.port = free_port()
        self.log = open(os.path.join(work, "postgres.log"), "w")
        if as_root:
            os.chown(self.log.name, NOBODY, NOBODY)
        self.proc = subprocess.Popen(
            [f"{self.bin}/postgres", "-D", self.data, "-p", str(self.port), "-k", work,
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
             "-c", "fsync=on", "-c", "synchronous_commit=on"],
            stdout=self.log, stderr=self.log, preexec_fn=as_nobody)
        deadline = time.monotonic() + 30
        while subprocess.run([f"{self.bin}/pg_isready", "-q", "-h", work, "-p", str(self.port)]).returncode:
            if time.monotonic() > deadline:
                sys.exit("PostgreSQL did not start: see " + self.log.name)
            time.sleep(0.1)

    def sql(self, sql, database="postgres"):
        return subprocess.run(
            [f"{self.bin}/psql", "-h", work, "-p", str(self.port), "-U", USER, "-d", database,
             "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True).stdout.strip()

    def cpu(self):
        """CPU seconds every server process has used so far (the postmaster's children come
        and go only at connections, which the pools keep)."""
        total = cpu_of(self.proc.pid)
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:  # ppid
                total += (int(fields[11]) + int(fields[12])) / TICKS
        return total

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()


def cpu_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


class Daemon:
    """A hookroute on `storage` (a [storage] table's lines), its file sink in `directory`."""

    def __init__(self, directory, storage):
        os.makedirs(directory)
        self.sink = os.path.join(directory, "events.jsonl")
        config = os.path.join(directory, "config.toml")
        with open(config, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:0"
rate_limit = {{ enabled = false }}   # one client floods on purpose

[storage]
{storage}

[sources.compliancelayer]
secret = "{SECRET}"

[sinks.archive]
type = "file"
path = "{self.sink}"

[[routes]]
name = "everything to the archive"
events = ["*"]
sinks = ["archive"]
""")
        env = dict(os.environ, RUST_LOG="warn,hookroute=info,hookroute::http::ingest=warn,hookroute::intake=warn")
        self.log = open(os.path.join(directory, "hookroute.log"), "w+")
        self.proc = subprocess.Popen([f"{BIN}/hookroute", "serve", "--config", config],
                                     stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.log.seek(0)
            found = re.search(r"listening.*addr=([0-9.:]+)", self.log.read())
            if found:
                self.addr = found.group(1)
                return
            time.sleep(0.01)
        self.log.seek(0)
        sys.exit("hookroute did not start:\n" + self.log.read())

    def lines(self):
        try:
            with open(self.sink, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def ids(self):
        try:
            with open(self.sink) as f:
                return [re.search(r'"delivery_id":"([^"]*)"', line).group(1) for line in f]
        except FileNotFoundError:
            return []

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait() != 0:
            self.log.seek(0)
            sys.exit("hookroute failed:\n" + self.log.read())


def flood(daemons):
    urls = []
    for d in daemons:
        urls += ["--url", f"http://{d.addr}/hooks/compliancelayer"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [f"{BIN}/examples/bench-loadgen", *urls, "--secret", SECRET,
         "--connections", str(CONNECTIONS), "--duration", str(DURATION)],
        check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {k: float(v) for k, v in (kv.split("=") for kv in out.split())}
    if result["failed"]:
        sys.exit(f"hookroute answered non-2xx: {out}")
    result["loadgen_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def run(variant, round_no, cluster):
    """One variant on a fresh database: its figures."""
    directory = os.path.join(work, f"{round_no}-{variant}")
    replicas = 2 if variant == "postgres x2" else 1
    if variant == "sqlite":
        path = f"{directory}-0/hookroute.db"
        storage = f'path = "{path}"'
        count = lambda: sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()[0]
    else:
        database = f"bench_{round_no}_{replicas}"
        cluster.sql(f"CREATE DATABASE {database}")
        storage = (f'url = "postgres://{USER}@127.0.0.1:{cluster.port}/{database}"\n'
                   f'password = {{ file = "{cluster.password_file}" }}')
        count = lambda: int(cluster.sql("SELECT count(*) FROM events", database))
    daemons = [Daemon(f"{directory}-{i}", storage) for i in range(replicas)]
    if variant != "sqlite":
        stats = lambda: cluster.sql(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())"
            " || ' ' || wal_sync FROM pg_stat_wal", database).split()
        commits0, syncs0 = map(int, stats())
        pg_cpu0 = cluster.cpu()
    hr_cpu0 = sum(cpu_of(d.proc.pid) for d in daemons)
    started = time.monotonic()
    result = flood(daemons)
    acked = int(result["ok"])
    deadline = time.monotonic() + 120
    while sum(d.lines() for d in daemons) < acked:
        if time.monotonic() > deadline:
            sys.exit(f"{variant}: only {sum(d.lines() for d in daemons)} of {acked} delivered")
        time.sleep(0.01)
    result["delivered_s"] = acked / (time.monotonic() - started)
    result["wall"] = time.monotonic() - started
    result["hookroute_cpu"] = sum(cpu_of(d.proc.pid) for d in daemons) - hr_cpu0
    result["postgres_cpu"] = 0.0
    if variant != "sqlite":
        result["postgres_cpu"] = cluster.cpu() - pg_cpu0
        commits, syncs = map(int, stats())
        # Each request is one transaction; reads (claims, finishes) commit too.
        result["commits_per_flush"] = (commits - commits0) / max(1, syncs - syncs0)
    for d in daemons:
        d.stop()
    stored = count()
    ids = [i for d in daemons for i in d.ids()]
    if stored != acked:
        sys.exit(f"{variant}: {acked} acknowledged, {stored} stored")
    if len(ids) != acked or len(set(ids)) != acked:
        sys.exit(f"{variant}: {acked} acknowledged, {len(ids)} lines, {len(set(ids))} distinct")
    return result


def main():
    cluster = Cluster()
    variants = ["sqlite", "postgres x1", "postgres x2"]
    ratios = {v: [] for v in variants[1:]}
    print(f"{'round':<6} {'backend':<12} {'acked/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'delivered/s':>11}"
          f"   CPU ms per 1k events: {'hookroute':>9} {'postgres':>8} {'loadgen':>7} {'idle':>5}  commits/flush")
    try:
        for round_no in range(1, ROUNDS + 1):
            base = None
            for variant in variants:
                r = run(variant, round_no, cluster)
                per_k = lambda seconds: 1000 * seconds / r["ok"] * 1000
                idle = max(0.0, 2 * r["wall"] - r["hookroute_cpu"] - r["postgres_cpu"] - r["loadgen_cpu"])
                flushes = f"{r['commits_per_flush']:.1f}" if "commits_per_flush" in r else "-"
                print(f"{round_no:<6} {variant:<12} {r['rps']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
                      f" {r['delivered_s']:>11.0f}   {'':>22}{per_k(r['hookroute_cpu']):>9.0f}"
                      f" {per_k(r['postgres_cpu']):>8.0f} {per_k(r['loadgen_cpu']):>7.0f} {per_k(idle):>5.0f}"
                      f"  {flushes:>13}", flush=True)
                if base is None:
                    base = r
                else:
                    ratios[variant].append((r["delivered_s"] / base["delivered_s"], r["rps"] / base["rps"]))
        print()
        for variant, rs in ratios.items():
            print(f"{variant} / sqlite: delivered/s "
                  + " ".join(f"{d:.2f}x" for d, _ in rs)
                  + f" (median {statistics.median(d for d, _ in rs):.2f}x), acked/s "
                  + " ".join(f"{a:.2f}x" for _, a in rs)
                  + f" (median {statistics.median(a for _, a in rs):.2f}x)")
        print("every 2xx stored once and delivered exactly once")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
