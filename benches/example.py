"""The example-configuration benchmark (benches/example.sh runs it): hookroute on the shipped
config.example.toml (rate limit off, paths in a temporary directory), as a new user runs it,
next to a bare axum server and Debian's adnanh/webhook in the same run.

For each round it measures:
- latency at a steady 2,000 signed 1 KiB deliveries/s (32 connections, 10 s after 3 s of
  warm-up): bare axum; hookroute on the example; the example with only its first route (every
  event to the archive: no CEL, no throttle, no console log sink); the example with no route
  at all (ingest alone). The differences say where the time
  between bare and the example goes;
- the full-load rate of a flood (64 connections): hookroute on the example (every 2xx durable,
  two jobs per alert) against adnanh/webhook verifying the same HMAC and starting /bin/true
  (nothing stored), when `webhook` is installed;
- hookroute's resident memory before, right after, and 10 s after the flood.

The machine is noisy: every figure is given against the baseline measured in the same round.
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = "target/release"
SECRET = "whsec_example_change_me"  # the example configuration's own
PATH = "/hooks/compliancelayer"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RATE = int(os.environ.get("RATE", "2000"))
STEADY = int(os.environ.get("STEADY", "10"))
DURATION = int(os.environ.get("DURATION", "10"))

work = tempfile.mkdtemp(prefix="hookroute-example-")


def example(variant):
    """config.example.toml as the quick start runs it, in `work`, changed only as `variant`
    says (and the rate limit off: one load generator is one client)."""
    with open("config.example.toml") as f:
        text = f.read()
    data = os.path.join(work, variant)
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    text = text.replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:0"')
    text = re.sub(r"(\[server\.rate_limit\]\n)enabled = true", r"\1enabled = false", text)
    text = text.replace("./data/", data + "/")
    # The routes, each a block up to the next table; what follows them (templates) stays.
    blocks = re.split(r"\n(?=\[)", text)
    routes = [b for b in blocks if b.startswith("[[routes]]")]
    if variant == "archive-only":
        text = "\n".join(b for b in blocks if b not in routes[1:])
    elif variant == "ingest":
        text = "\n".join(b for b in blocks if b not in routes)
    path = os.path.join(data, "config.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class Server:
    """A server started from `argv`, its address read from its log."""

    def __init__(self, argv, pattern, log_name, addr=None):
        self.log_path = os.path.join(work, log_name)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        self.addr = None
        while True:
            if addr is None:
                with open(self.log_path) as f:
                    found = re.search(pattern, f.read())
                self.addr = found and found.group(1)
            elif accepts(addr):
                self.addr = addr
            if self.addr:
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                with open(self.log_path) as f:
                    sys.exit(f"{argv[0]} did not start:\n{f.read()}")
            time.sleep(0.05)

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        return kib / 1024

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hookroute(variant):
    return Server([f"{BIN}/hookroute", "serve", "--config", example(variant)],
                  r"listening.*?addr=([0-9.:]+)", f"hookroute-{variant}.log")


def bare():
    return Server([f"{BIN}/examples/bench-bare"], r"listening.*?addr=([0-9.:]+)", "bare.log")


def webhook():
    """adnanh/webhook with one hook: the ComplianceLayer signature checked (bare hex
    HMAC-SHA256 of the body, as hookroute checks it), then /bin/true started."""
    hooks = os.path.join(work, "hooks.json")
    with open(hooks, "w") as f:
        f.write('''[{"id": "compliancelayer", "execute-command": "/bin/true",
  "trigger-rule": {"match": {"type": "payload-hmac-sha256", "secret": "%s",
    "parameter": {"source": "header", "name": "X-ComplianceLayer-Signature"}}}}]''' % SECRET)
    # Not -verbose: a log line per request would cost it; started is when it accepts.
    port = free_port()
    return Server([shutil.which("webhook"), "-hooks", hooks, "-ip", "127.0.0.1",
                   "-port", str(port)], None, "webhook.log", addr=f"127.0.0.1:{port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(addr):
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def load(addr, path, *args):
    out = subprocess.run(
        [f"{BIN}/examples/bench-loadgen", "--url", f"http://{addr}{path}", "--secret", SECRET,
         *map(str, args)],
        check=True, capture_output=True, text=True).stdout
    result = dict(kv.split("=") for kv in out.split())
    return {k: float(v) for k, v in result.items()}


def steady(addr, path=PATH):
    load(addr, path, "--connections", 32, "--rate", RATE, "--duration", 3)
    return load(addr, path, "--connections", 32, "--rate", RATE, "--duration", STEADY)


def flood(addr, path):
    return load(addr, path, "--connections", 64, "--duration", DURATION)


def main():
    have_webhook = shutil.which("webhook") is not None
    if not have_webhook:
        print("webhook (adnanh/webhook) is not installed: apt-get install webhook; "
              "its comparison is left out", file=sys.stderr)
    rows = []
    print("round  server        p50 ms   p99 ms   failed   (steady %d/s, %d s)" % (RATE, STEADY))
    for round in range(1, ROUNDS + 1):
        row = {}
        server = bare()
        row["bare"] = steady(server.addr)
        server.stop()
        for variant in ["example", "archive-only", "ingest"]:
            server = hookroute(variant)
            row[variant] = steady(server.addr)
            server.stop()
        for name in ["bare", "example", "archive-only", "ingest"]:
            r = row[name]
            print(f"{round:<6} {name:<12} {r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}   {r['failed']:>6.0f}")
        server = hookroute("example")
        before = server.rss_mib()
        row["flood"] = flood(server.addr, PATH)
        row["rss"] = (before, server.rss_mib())
        time.sleep(10)
        row["rss"] += (server.rss_mib(),)
        server.stop()
        if have_webhook:
            server = webhook()
            row["webhook"] = flood(server.addr, "/hooks/compliancelayer")
            server.stop()
        flood_line = f"{round:<6} flood        hookroute {row['flood']['rps']:,.0f}/s"
        if have_webhook:
            flood_line += f", webhook {row['webhook']['rps']:,.0f}/s ({row['flood']['rps'] / row['webhook']['rps']:.2f}x)"
        flood_line += "; hookroute RSS %.0f MiB before, %.0f after, %.0f 10 s later" % row["rss"]
        print(flood_line)
        rows.append(row)

    def median(f):
        return statistics.median(f(r) for r in rows)

    print()
    for name in ["example", "archive-only", "ingest"]:
        p50 = [r[name]["p50_ms"] - r["bare"]["p50_ms"] for r in rows]
        p99 = [r[name]["p99_ms"] - r["bare"]["p99_ms"] for r in rows]
        print(f"{name:<11} p50 - bare: " + " ".join(f"{d:+.2f}" for d in p50)
              + f" ms (median {statistics.median(p50):+.2f}); p99 - bare: "
              + " ".join(f"{d:+.2f}" for d in p99) + f" ms (median {statistics.median(p99):+.2f})")
    if have_webhook:
        ratios = [r["flood"]["rps"] / r["webhook"]["rps"] for r in rows]
        print("hookroute (example, durable) / webhook: " + " ".join(f"{x:.2f}x" for x in ratios)
              + f" (median {statistics.median(ratios):.2f}x; target >= 1.25x)")
    print("hookroute RSS after the flood: median %.0f MiB, 10 s later %.0f MiB (before: %.0f)"
          % (median(lambda r: r["rss"][1]), median(lambda r: r["rss"][2]), median(lambda r: r["rss"][0])))
    floods = ["flood", "webhook"] if have_webhook else ["flood"]
    failed = sum(r[k]["failed"] for r in rows for k in ["example", "archive-only", "ingest", *floods])
    if failed:
        sys.exit(f"{failed:.0f} requests failed")


try:
    main()
finally:
    shutil.rmtree(work, ignore_errors=True)
