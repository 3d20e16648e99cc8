#!/usr/bin/env python3
"""Load-test driver behind loadtest/run.sh (which installs the tools, starts PostgreSQL and builds
the release binary first). Standard library plus matplotlib for the plots.

Why a script and not a Rust bench: the figures must come from the tools users run against the
service (curl, ab, oha) and from pgbench on the same SQL, in one invocation, so that every ratio
compares runs made on the same machine at the same time. Every step is bounded in time and count
and targets 127.0.0.1 only; whatever this script starts it stops, also on Ctrl-C or failure.
"""

import argparse
import concurrent.futures
import datetime
import http.server as http_server
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "loadtest")
SCENARIOS = ["spike", "steps", "sustained", "auth", "db_tls", "pooler", "compression", "telemetry", "flood", "overload", "outage", "soak"]  # baseline runs inside sustained
STARTED = []  # processes to stop on exit

# Every run is authenticated, as production is (AUTH_MODE=jwt): one caller, whose token each
# request carries and whose todos the seed writes; pgbench runs the same SQL for the same owner.
OWNER = "loadtest"
AUTH_SECRET = secrets.token_urlsafe(48)
AUTH = {"token": None}  # minted by main() with the built binary


def bearer():
    """The Authorization header, as a "name: value" string for curl/ab/oha."""
    return f"authorization: Bearer {AUTH['token']}"


def mint_token(binary):
    out = subprocess.run([binary, "token", "--sub", OWNER, "--ttl", "12h"],
                         env=dict(os.environ, AUTH_JWT_SECRET=AUTH_SECRET),
                         capture_output=True, text=True, timeout=30, check=True)
    AUTH["token"] = out.stdout.strip()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(method, url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if AUTH["token"] and "/todos" in url:
        req.add_header("Authorization", f"Bearer {AUTH['token']}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def run(cmd, timeout, **kw):
    """Runs a load tool with a hard time bound; returns (stdout, the command as a string)."""
    shown = " ".join(shlex.quote(c) for c in cmd)
    if AUTH["token"]:
        # The token stays out of the log and the results (they are shared; it is a credential).
        shown = shown.replace(AUTH["token"], "$TOKEN")
    log(f"  $ {shown}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout, shown


# --- the service and the database -----------------------------------------------------------

SERVICE_BINARY = os.path.join(ROOT, "target", "release", "todo-service")
LEAN_TWIN_BINARY = os.path.join(ROOT, "target", "release", "examples", "lean_service")
OTLP_SINK_BINARY = os.path.join(ROOT, "target", "release", "examples", "otlp_sink")


class Service:
    def __init__(self, url, database_url, extra_env=None, binary=SERVICE_BINARY, ready_path="/ready"):
        self.url = url
        self.database_url = database_url
        self.proc = None
        self.extra_env = extra_env or {}
        self.binary = binary
        self.ready_path = ready_path

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": self.database_url,
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            # Several services run at once here: each its own admin port.
            "ADMIN_LISTEN_ADDR": "127.0.0.1:0",
            # Every load comes from one IP, so the per-client limit is set out of reach: the
            # limiter still runs on every request (its cost is measured) but refuses none.
            "RATE_LIMIT_PER_SECOND": "1000000",
            "RATE_LIMIT_BURST": "1000000",
            "LOG_LEVEL": "warn",
            "OTEL_SDK_DISABLED": "true",
            "AUTH_MODE": "jwt",
            "AUTH_JWT_SECRET": AUTH_SECRET,
            # The lean twin has no authentication; it serves the same owner's rows.
            "LEAN_TWIN_OWNER": OWNER,
        })
        env.update(self.extra_env)
        self.proc = subprocess.Popen([self.binary], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        STARTED.append(self.proc)
        deadline = time.time() + 30
        while time.time() < deadline:
            if http("GET", self.url + self.ready_path)[0] == 200:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited during startup")
            time.sleep(0.1)
        raise RuntimeError("the service did not become ready in 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def cpu_ticks(self):
        """User + system CPU the service has used, in clock ticks (/proc/<pid>/stat)."""
        if not self.proc:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                # Fields after the command name, which may hold spaces: utime and stime are the
                # 12th and 13th of them.
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None

    def rss_kib(self):
        if not self.proc:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


def psql(database_url, sql):
    binary = os.path.join(os.environ["PG_BIN"], "psql")
    return subprocess.run([binary, database_url, "-qtAc", sql], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def seed(database_url, rows, owner=OWNER):
    """A known data set: `rows` todos of `owner` with ids 1..rows (the table is emptied and
    renumbered)."""
    psql(database_url, "TRUNCATE todos RESTART IDENTITY")
    psql(database_url, f"INSERT INTO todos (title, position, owner) SELECT 'seeded todo ' || g, "
                       f"CASE WHEN g % 3 = 0 THEN g END, '{owner}' FROM generate_series(1, {rows}) g")
    psql(database_url, "VACUUM ANALYZE todos")


def as_owner(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


class Postgres:
    """The throwaway cluster run.sh started, for the outage scenario."""

    def __init__(self):
        self.data = os.environ.get("LOADTEST_PG_DATA")
        self.log = os.environ.get("LOADTEST_PG_LOG")
        self.opts = None

    def available(self):
        return bool(self.data)

    def stop(self):
        with open(os.path.join(self.data, "postmaster.opts")) as f:
            args = shlex.split(f.read())[1:]
        # Restart with the same options (port, socket dir) it was started with, minus -D.
        keep, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a == "-D":
                skip = True
                continue
            keep.append(a)
        self.opts = " ".join(shlex.quote(a) for a in keep)
        subprocess.run(as_owner([os.path.join(os.environ["PG_BIN"], "pg_ctl"), "-D", self.data,
                                 "-m", "fast", "-w", "stop"]), check=True, capture_output=True,
                       cwd="/", timeout=60)

    def start(self):
        subprocess.run(as_owner([os.path.join(os.environ["PG_BIN"], "pg_ctl"), "-D", self.data,
                                 "-l", self.log, "-o", self.opts, "-w", "start"]), check=True,
                       capture_output=True, cwd="/", timeout=60)


# --- tool output parsers ----------------------------------------------------------------------

def parse_ab(text):
    def num(pattern, default=None):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default
    pct = {int(p): float(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.M)}
    return {
        "rps": num(r"Requests per second:\s+([\d.]+)"),
        "p50_ms": pct.get(50),
        "p99_ms": pct.get(99),
        "failed": int(num(r"Failed requests:\s+(\d+)", 0)),
        "non_2xx": int(num(r"Non-2xx responses:\s+(\d+)", 0)),
        "complete": int(num(r"Complete requests:\s+(\d+)", 0)),
    }


def parse_oha(text):
    j = json.loads(text)
    s = j.get("summary", {})
    pct = j.get("latencyPercentiles", {})
    ms = lambda v: None if v is None else v * 1000.0  # noqa: E731
    return {
        "rps": s.get("requestsPerSec"),
        "success_rate": s.get("successRate"),
        "p50_ms": ms(pct.get("p50")),
        "p99_ms": ms(pct.get("p99")),
        "p99_9_ms": ms(pct.get("p99.9")),
        "bytes_per_request": s.get("sizePerRequest"),
        "statuses": {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()},
        "non_2xx": sum(v for k, v in (j.get("statusCodeDistribution") or {}).items()
                       if not str(k).startswith("2")),
        "errors": j.get("errorDistribution") or {},
    }


def parse_pgbench(text, log_dir):
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
    latencies = []
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    latencies.append(int(parts[2]) / 1000.0)  # µs → ms
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None  # noqa: E731
    return {"tps": float(tps.group(1)) if tps else None, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "p99_9_ms": q(0.999), "transactions": len(latencies)}


# --- scenarios --------------------------------------------------------------------------------

def spike(svc, args, res):
    """The post-mortem's protocol: 120 simultaneous curl GET /todos, 5 rounds."""
    rounds = []
    for n in range(5):
        procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-m", "30", "-w",
                                  "%{http_code}", "-H", bearer(), svc.url + "/todos"],
                                 stdout=subprocess.PIPE,
                                 text=True) for _ in range(120)]
        started = time.time()
        codes = {}
        for p in procs:
            out, _ = p.communicate(timeout=60)
            codes[out.strip() or "000"] = codes.get(out.strip() or "000", 0) + 1
        wall = time.time() - started
        rounds.append({"round": n + 1, "statuses": codes, "wall_s": round(wall, 3)})
        log(f"  spike round {n + 1}: {codes} in {wall:.2f} s")
    res["spike"] = {"command": f"120 x curl -s -o /dev/null -w %{{http_code}} {svc.url}/todos, 5 rounds",
                    "rounds": rounds}


def steps(svc, args, res):
    levels = [10, 50, 200] if args.quick else [10, 25, 50, 100, 200, 500]
    out = []
    for c in levels:
        n = max(c * (20 if args.quick else 100), 1000 if args.quick else 5000)
        text, cmd = run(["ab", "-q", "-n", str(n), "-c", str(c), "-s", "30", "-H", bearer(),
                         svc.url + "/todos?limit=20"], timeout=300)
        r = parse_ab(text)
        r.update({"concurrency": c, "requests": n, "command": cmd})
        out.append(r)
        log(f"  ab c={c}: {r['rps']} rps, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"failed {r['failed']}, non-2xx {r['non_2xx']}")
    res["steps"] = out


WORKLOADS = {
    # name: (oha args after the URL base, pgbench script)
    "get-one": (["--rand-regex-url", "{base}/todos/[1-9][0-9]{{0,2}}"], "get-one.sql"),
    "list": (["{base}/todos?limit=20"], "list.sql"),
    "post": (["-m", "POST", "-H", "content-type: application/json", "-d", '{{"title":"load test"}}',
              "{base}/todos"], "post.sql"),
    "patch": (["-m", "PATCH", "-H", "content-type: application/json", "-d", '{{"completed":true}}',
               "--rand-regex-url", "{base}/todos/[1-9][0-9]{{0,2}}"], "patch.sql"),
}


# oha asks for gzip and br unless told not to; answers are measured as they were before
# compression and as the lean twin gives them (uncompressed), and the compression scenario asks
# for each coding itself.
OHA = ["oha", "--no-tui", "--output-format", "json", "--disable-compression"]


def oha(svc, extra, seconds, conc):
    # With --rand-regex-url the URL is a pattern: the dots of the address must be literal.
    # ("[.]", not "\\.": oha's generator does not take the escape as a literal dot).
    base = svc.url.replace(".", "[.]") if "--rand-regex-url" in extra else svc.url
    args = [a.format(base=base) for a in extra]
    # The URL (or --rand-regex-url's pattern) comes last; oha's own flags first.
    cmd = OHA + ["-z", f"{seconds}s", "-c", str(conc), "-H", bearer()] + args
    text, shown = run(cmd, timeout=seconds + 60)
    return parse_oha(text), shown


def pgbench(database_url, script, seconds, conc, rows, protocol="prepared"):
    with tempfile.TemporaryDirectory() as d:
        cmd = [os.path.join(os.environ["PG_BIN"], "pgbench"), "-n", "-M", protocol,
               "-c", str(conc), "-j", "2", "-T", str(seconds), "-D", f"seed_rows={rows}",
               "-D", f"owner={OWNER}",
               "-l", "--log-prefix", os.path.join(d, "tx"),
               "-f", os.path.join(HERE, "pgbench", script), database_url]
        text, shown = run(cmd, timeout=seconds + 60)
        return parse_pgbench(text, d), shown


def sustained(svc, args, res):
    """oha at c=64 per workload, each interleaved with pgbench running the same SQL, and then the
    lean twin (examples/lean_service.rs) on the same workload: the ratio to pgbench says what the
    HTTP service costs over the database, the ratio to the twin what this service's layers cost."""
    seconds = args.duration
    out = {}
    for name, (extra, script) in WORKLOADS.items():
        if name in ("post", "patch"):
            seed(svc.database_url, args.rows)  # writes grow the table; each run starts alike
        base, base_cmd = pgbench(svc.database_url, script, seconds, 64, min(args.rows, 999))
        seed(svc.database_url, args.rows)
        http_r, cmd, us = oha_cpu(svc, extra, seconds)
        ratio = (http_r["rps"] / base["tps"]) if base["tps"] else None
        out[name] = {"http": http_r, "http_command": cmd, "pgbench": base,
                     "pgbench_command": base_cmd, "ratio_to_pgbench": ratio, "cpu_us_per_request": us}
        log(f"  {name}: {http_r['rps']:.0f} rps (p99 {http_r['p99_ms']:.2f} ms, non-2xx "
            f"{http_r['non_2xx']}, CPU {us} µs/request) vs pgbench {base['tps']:.0f} tps "
            f"(p99 {base['p99_ms']:.2f} ms): {ratio:.2f}x")
        if name in ("post", "patch"):
            seed(svc.database_url, args.rows)
        twin = lean_twin(svc, name, extra, seconds)
        if twin:
            twin["ratio_to_pgbench"] = (twin["http"]["rps"] / base["tps"]) if base["tps"] else None
            twin["pgbench"] = base
            out[f"{name}, lean twin"] = twin
            t = twin["http"]
            out[name]["ratio_to_twin"] = round(http_r["rps"] / t["rps"], 3) if t["rps"] else None
            out[name]["p99_to_twin"] = round(http_r["p99_ms"] / t["p99_ms"], 2) if t["p99_ms"] else None
            log(f"  {name}: service / lean twin {out[name]['ratio_to_twin']}x throughput, "
                f"{out[name]['p99_to_twin']}x p99")
    # Mixed 80/20 read/write: two oha processes at once, 51 + 13 connections.
    seed(svc.database_url, args.rows)
    results = {}

    def go(key, extra, conc):
        results[key] = oha(svc, extra, seconds, conc)

    threads = [threading.Thread(target=go, args=("read", WORKLOADS["get-one"][0], 51)),
               threading.Thread(target=go, args=("write", WORKLOADS["post"][0], 13))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read, write = results["read"][0], results["write"][0]
    out["mixed-80-20"] = {"http": {"rps": read["rps"] + write["rps"], "read": read, "write": write},
                          "http_command": results["read"][1] + "  &  " + results["write"][1]}
    log(f"  mixed 80/20: {read['rps'] + write['rps']:.0f} rps "
        f"(read p99 {read['p99_ms']:.2f} ms, write p99 {write['p99_ms']:.2f} ms)")
    res["sustained"] = {"concurrency": 64, "seconds": seconds, "workloads": out}


def lean_twin(svc, name, extra, seconds):
    """The same workload against examples/lean_service.rs (axum + deadpool + sqlx, no middleware),
    right after the service's run: what the service's layers cost, in the same minute."""
    if not svc.proc or not os.path.exists(LEAN_TWIN_BINARY):
        log("  lean twin: skipped (needs a service this script starts and the built example)")
        return None
    twin = Service(None, svc.database_url, binary=LEAN_TWIN_BINARY, ready_path="/todos/1")
    try:
        twin.start()
        r, cmd, us = oha_cpu(twin, extra, seconds)
    finally:
        twin.stop()
    log(f"  {name}, lean twin (no middleware): {r['rps']:.0f} rps (p99 {r['p99_ms']:.2f} ms, "
        f"non-2xx {r['non_2xx']}, CPU {us} µs/request)")
    return {"http": r, "http_command": cmd, "cpu_us_per_request": us}


class OtlpSink:
    """A stand-in for SigNoz's collector: accepts OTLP/HTTP exports and counts them."""

    def __init__(self):
        self.counts = {}
        sink = self

        class Handler(http_server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                c = sink.counts.setdefault(self.path, {"requests": 0, "bytes": 0})
                c["requests"] += 1
                c["bytes"] += len(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def oha_cpu(target, extra, seconds):
    """oha -c 64 against `target`, and the service's CPU per answered request (µs, from /proc)."""
    before = target.cpu_ticks()
    r, cmd = oha(target, extra, seconds, 64)
    after = target.cpu_ticks()
    requests = sum(r["statuses"].values())
    us = (round((after - before) / os.sysconf("SC_CLK_TCK") * 1e6 / requests, 1)
          if None not in (before, after) and requests else None)
    return r, cmd, us


def auth(svc, args, res):
    """What authentication costs: get-one at c=64 with a bearer token (HS256) verified on every
    request (AUTH_MODE=jwt, as every other scenario runs) against the same build without
    authentication (AUTH_MODE=none), interleaved jwt, none, jwt, none so drift hits both alike.
    The none service serves the anonymous owner, so the rows are seeded as its for its runs (same
    ids, same titles). The difference in the service's CPU per request is the cost of reading the
    header, verifying the token, and keying the rate limit by its sub instead of the address."""
    if not svc.proc:
        res["auth"] = {"skipped": "needs a service this script starts (no --url)"}
        log("  skipped: needs a service this script starts")
        return
    none = Service(None, svc.database_url, {"AUTH_MODE": "none"})
    runs = {"jwt": [], "none": []}
    cpu = {"jwt": [], "none": []}
    extra = WORKLOADS["get-one"][0]
    try:
        none.start()
        for _ in range(2):
            for name, target, owner in (("jwt", svc, OWNER), ("none", none, "")):
                seed(svc.database_url, args.rows, owner)
                r, cmd, us = oha_cpu(target, extra, args.duration)
                runs[name].append(r["rps"])
                cpu[name].append(us)
                log(f"  auth {name}: {r['rps']:.0f} rps (p99 {r['p99_ms']:.2f} ms, statuses "
                    f"{r['statuses']}), service CPU {us} µs/request")
    finally:
        none.stop()
        seed(svc.database_url, args.rows)

    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.mean(values), 1) if values else None

    jwt_cpu, none_cpu = mean(cpu["jwt"]), mean(cpu["none"])
    res["auth"] = {"workload": "get-one, oha c=64, HS256 bearer token vs AUTH_MODE=none",
                   "rps_jwt": runs["jwt"], "rps_none": runs["none"],
                   "cpu_us_per_request": {"jwt": jwt_cpu, "none": none_cpu},
                   "verification_cpu_us": (round(jwt_cpu - none_cpu, 1)
                                           if None not in (jwt_cpu, none_cpu) else None),
                   "rps_ratio": (round(statistics.mean(runs["jwt"]) / statistics.mean(runs["none"]), 3)
                                 if statistics.mean(runs["none"]) else None)}
    log(f"  authentication: {res['auth']['rps_ratio']} of the throughput without it; "
        f"service CPU {jwt_cpu} vs {none_cpu} µs/request "
        f"(+{res['auth']['verification_cpu_us']} µs)")


def set_server_tls(database_url, data_dir, on):
    """Turns TLS on (with a fresh self-signed certificate in the cluster's directory) or off on the
    throwaway cluster, by ALTER SYSTEM and a reload: no restart."""
    if on:
        key, crt = (os.path.join(data_dir, f"loadtest-server.{ext}") for ext in ("key", "crt"))
        subprocess.run(as_owner(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                                 "-subj", "/CN=localhost", "-keyout", key, "-out", crt]),
                       cwd="/", check=True, capture_output=True, timeout=60)
        subprocess.run(as_owner(["chmod", "600", key]), cwd="/", check=True, timeout=30)
        psql(database_url, f"ALTER SYSTEM SET ssl_cert_file = '{crt}'")
        psql(database_url, f"ALTER SYSTEM SET ssl_key_file = '{key}'")
        psql(database_url, "ALTER SYSTEM SET ssl = on")
    else:
        for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
            psql(database_url, f"ALTER SYSTEM RESET {setting}")
    psql(database_url, "SELECT pg_reload_conf()")
    time.sleep(0.5)


def side_by_side(targets, args, protocol="prepared", workload="get-one"):
    """`workload` (GET one todo unless told) at oha -c 64 against each service in `targets` (by
    name), and pgbench on the same database URL beside each, interleaved (`--rounds`, 2 unless
    told) so drift hits all alike. Starts and stops the services. Returns rps, pgbench tps, the service's CPU per request
    and the first commands; with two targets the ratios of the first to the second, with more,
    each later one's ratio to the first (by name)."""
    extra, script = WORKLOADS[workload]
    out = {"rps": {n: [] for n in targets}, "pgbench_tps": {n: [] for n in targets}}
    cpu = {n: [] for n in targets}
    commands = []
    try:
        for t in targets.values():
            t.start()
        for _ in range(args.rounds):
            for name, target in targets.items():
                r, cmd, us = oha_cpu(target, extra, args.duration)
                b, bcmd = pgbench(target.database_url, script, args.duration, 64,
                                  min(args.rows, 999), protocol=protocol)
                out["rps"][name].append(r["rps"])
                out["pgbench_tps"][name].append(b["tps"])
                cpu[name].append(us)
                commands += [cmd, bcmd]
                log(f"  {name}: service {r['rps']:.0f} rps (p99 {r['p99_ms']:.2f} ms, non-2xx "
                    f"{r['non_2xx']}, {us} µs/request), pgbench -M {protocol} {b['tps']:.0f} tps")
    finally:
        for t in targets.values():
            t.stop()

    def ratio(a, b):
        return round(statistics.mean(a) / statistics.mean(b), 3) if statistics.mean(b) else None

    out["cpu_us_per_request"] = {k: round(statistics.mean(v), 1) if None not in v else None
                                 for k, v in cpu.items()}
    names = list(targets)
    if len(names) == 2:
        first, second = names
        out["service_ratio"] = ratio(out["rps"][first], out["rps"][second])
        out["pgbench_ratio"] = ratio(out["pgbench_tps"][first], out["pgbench_tps"][second])
    else:
        reference = names[0]
        out["service_ratio"] = {n: ratio(out["rps"][n], out["rps"][reference]) for n in names[1:]}
        out["pgbench_ratio"] = {n: ratio(out["pgbench_tps"][n], out["pgbench_tps"][reference])
                                for n in names[1:]}
    out["commands"] = commands[:2 * len(names)]
    return out


def db_tls(svc, args, res):
    """What TLS to PostgreSQL costs: get-one at c=64 with the service's connections over TLS
    (sslmode=require) against the same build in plain text (sslmode=disable), on the same server
    with ssl = on, interleaved; and pgbench, whose libpq speaks TLS natively, the same way. The
    service's TLS goes through the relay (src/db/relay.rs) that hands sqlx the stream, so the
    difference between the two ratios is that hop's cost beyond TLS itself."""
    pg = Postgres()
    if not svc.proc or not pg.available():
        res["db_tls"] = {"skipped": "needs the throwaway cluster and a service this script starts"}
        log("  skipped: needs the throwaway cluster and a service this script starts")
        return
    sep = "&" if "?" in svc.database_url else "?"
    targets = {"tls": Service(None, svc.database_url + sep + "sslmode=require"),
               "plain": Service(None, svc.database_url + sep + "sslmode=disable")}
    set_server_tls(svc.database_url, pg.data, True)
    try:
        encrypted = psql(svc.database_url + sep + "sslmode=require",
                         "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").strip()
        if encrypted != "t":
            raise RuntimeError(f"the server did not turn TLS on (pg_stat_ssl says {encrypted!r})")
        out = side_by_side(targets, args)
    finally:
        set_server_tls(svc.database_url, pg.data, False)
    res["db_tls"] = {"workload": "get-one, oha c=64; pgbench get-one.sql c=64; sslmode=require vs disable",
                     **out}
    cpus = out["cpu_us_per_request"]
    log(f"  TLS to PostgreSQL: the service keeps {out['service_ratio']} of its plain "
        f"throughput, pgbench {out['pgbench_ratio']}; service CPU {cpus['tls']} vs "
        f"{cpus['plain']} µs/request")


class PgBouncer:
    """A PgBouncer in transaction mode in front of the throwaway cluster, for the pooler scenario:
    Debian's 1.18 (`PGBOUNCER_1_18`) or one that carries prepared statements
    (`PGBOUNCER_PREPARED`, from scripts/build-pgbouncer.sh), with max_prepared_statements."""

    def __init__(self, database_url, server_connections, prepared):
        variable = "PGBOUNCER_PREPARED" if prepared else "PGBOUNCER_1_18"
        self.binary = os.environ.get(variable) or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.dir = tempfile.mkdtemp(prefix="todo-service-loadtest-pgbouncer-")
        self.port = free_port()
        server = urllib.parse.urlsplit(database_url)
        with open(os.path.join(self.dir, "userlist.txt"), "w") as f:
            f.write(f'"{server.username}" ""\n')
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write(f"[databases]\n* = host={server.hostname} port={server.port}\n\n[pgbouncer]\n"
                    f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                    f"auth_type = trust\nauth_file = {self.dir}/userlist.txt\n"
                    f"pool_mode = transaction\ndefault_pool_size = {server_connections}\n"
                    f"max_client_conn = 1000\nignore_startup_parameters = extra_float_digits,options\n"
                    + ("max_prepared_statements = 200\n" if prepared else "")
                    + f"logfile = {self.dir}/pgbouncer.log\npidfile = {self.dir}/pgbouncer.pid\n")
        self.url = server._replace(netloc=f"{server.username}@127.0.0.1:{self.port}").geturl()
        self.version = subprocess.run([self.binary, "--version"], capture_output=True,
                                      text=True).stdout.split("\n")[0]

    def start(self):
        # A copy beside its configuration: run as the postgres user, it may not reach into the
        # checkout.
        binary = os.path.join(self.dir, "pgbouncer")
        shutil.copy(self.binary, binary)
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            subprocess.run(["chown", "-R", "postgres:", self.dir], check=True, timeout=30)
            os.chmod(self.dir, 0o755)
        subprocess.run(as_owner([binary, "-d", os.path.join(self.dir, "pgbouncer.ini")]),
                       cwd="/", check=True, capture_output=True, timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not listen")

    def stop(self):
        try:
            with open(os.path.join(self.dir, "pgbouncer.pid")) as f:
                # SIGINT: shut down once no query runs (from 1.23 on, SIGTERM waits for every
                # client to leave).
                os.kill(int(f.read().strip()), signal.SIGINT)
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
        shutil.rmtree(self.dir, ignore_errors=True)


# The service's default timeouts, which DB_POOLER_MODE=transaction-prepared needs the server's
# database settings to hold (the pooler passes no login options).
POOLED_SETTINGS = {"statement_timeout": "5s", "idle_in_transaction_session_timeout": "5s"}


def pooler(svc, args, res):
    """What a transaction pooler costs, per workload (get-one, list, POST, PATCH; get-one alone
    with --quick) at c=64: a service straight to PostgreSQL (named, cached statements), one through
    Debian's PgBouncer 1.18 (DB_POOLER_MODE=transaction: unnamed statements, each call in
    BEGIN ... COMMIT) and one through a PgBouncer that carries prepared statements
    (DB_POOLER_MODE=transaction-prepared: named statements, one exchange a statement), interleaved;
    pgbench runs the same SQL each way with the extended protocol, so the pooler's own cost and the
    service's mode are told apart. Each pooler has 16 server connections."""
    if not svc.proc:
        res["pooler"] = {"skipped": "needs a service this script starts (no --url)"}
        log("  skipped: needs a service this script starts")
        return
    database = urllib.parse.urlsplit(svc.database_url).path.lstrip("/")
    old, new = PgBouncer(svc.database_url, 16, False), PgBouncer(svc.database_url, 16, True)
    log(f"  poolers: {old.version} (transaction), {new.version} (transaction-prepared)")
    workloads = ["get-one"] if args.quick else ["get-one", "list", "post", "patch"]
    out = {"poolers": {"transaction": old.version, "transaction_prepared": new.version},
           "workloads": {}}
    for setting, value in POOLED_SETTINGS.items():
        psql(svc.database_url, f'ALTER DATABASE "{database}" SET {setting} = \'{value}\'')
    try:
        old.start()
        new.start()
        for workload in workloads:
            log(f"  {workload}")
            targets = {
                "direct": Service(None, svc.database_url),
                "transaction": Service(None, old.url, {"DB_POOLER_MODE": "transaction",
                                                       "DATABASE_MIGRATION_URL": svc.database_url}),
                "transaction_prepared": Service(None, new.url, {
                    "DB_POOLER_MODE": "transaction-prepared",
                    "DATABASE_MIGRATION_URL": svc.database_url}),
            }
            out["workloads"][workload] = side_by_side(targets, args, protocol="extended",
                                                      workload=workload)
    finally:
        old.stop()
        new.stop()
        for setting in POOLED_SETTINGS:
            psql(svc.database_url, f'ALTER DATABASE "{database}" RESET {setting}')
    res["pooler"] = {"workload": "oha c=64; pgbench -M extended c=64; PgBouncer 16 server "
                                 "connections, transaction mode", **out}
    for workload, d in out["workloads"].items():
        cpus = d["cpu_us_per_request"]
        log(f"  {workload} against direct: service {d['service_ratio']}, pgbench "
            f"{d['pgbench_ratio']}; service CPU µs/request "
            + ", ".join(f"{k} {v}" for k, v in cpus.items()))


CODINGS = ["none", "gzip", "br", "zstd"]


def compression(svc, args, res):
    """What compressing the answers costs and saves: a page of 100 todos (oha -c 64 on
    /todos?limit=100) without Accept-Encoding and with each coding, interleaved (--rounds); the
    service's CPU per request and the bytes each answer carries (oha counts them as they arrive,
    compressed). The seeded titles are alike ("seeded todo N"), so the ratio is higher than
    people's titles give: benches/compression.rs has that on a varied page."""
    seconds = max(2, args.duration // 2)
    seed(svc.database_url, max(args.rows, 100))
    out = {coding: [] for coding in CODINGS}
    for _ in range(args.rounds):
        for coding in CODINGS:
            extra = [] if coding == "none" else ["-H", f"accept-encoding: {coding}"]
            r, cmd, us = oha_cpu(svc, extra + ["{base}/todos?limit=100"], seconds)
            out[coding].append({"http": r, "command": cmd, "cpu_us_per_request": us})
    summary_ = {}
    for coding, runs in out.items():
        n = len(runs)
        mean = lambda f: round(sum(f(x) or 0 for x in runs) / n, 1)  # noqa: E731
        summary_[coding] = {"rps": mean(lambda x: x["http"]["rps"]),
                            "cpu_us_per_request": mean(lambda x: x["cpu_us_per_request"]),
                            "bytes_per_request": mean(lambda x: x["http"]["bytes_per_request"])}
    plain = summary_["none"]
    for coding, d in summary_.items():
        d["ratio"] = round(plain["bytes_per_request"] / d["bytes_per_request"], 1) if d["bytes_per_request"] else None
        d["cpu_us_over_none"] = round(d["cpu_us_per_request"] - plain["cpu_us_per_request"], 1)
        log(f"  {coding}: {d['rps']:.0f} rps, CPU {d['cpu_us_per_request']} µs/request "
            f"(+{d['cpu_us_over_none']}), {d['bytes_per_request']:.0f} B/answer ({d['ratio']}x)")
    res["compression"] = {"workload": "oha c=64 GET /todos?limit=100", "seconds": seconds,
                          "rounds": args.rounds, "runs": out, "summary": summary_}


def telemetry(svc, args, res):
    """What observability costs: throughput and the service's CPU per request with spans, metrics
    and logs exported to a receiver, and with logs at the default level, against neither. Four
    more services: two export OTLP/HTTP to an in-process sink, one tracing every request, one
    sampling 10 % (OTEL_TRACES_SAMPLER=parentbased_traceidratio); one traces every request over
    gRPC (the default protocol) to examples/otlp_sink.rs, which decodes and counts; all at
    LOG_LEVEL=warn like the baseline; one exports nothing at LOG_LEVEL=info (the default). Runs
    interleaved (off, all, sampled, ...) so drift in the machine hits all alike; CPU per request is
    the steadier figure on a noisy machine."""
    if not svc.proc:
        res["telemetry"] = {"skipped": "needs a service this script starts (no --url)"}
        log("  skipped: needs a service this script starts")
        return
    sink = OtlpSink()
    export = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    }
    traced_all = Service(None, svc.database_url, dict(export))
    sampled = Service(None, svc.database_url, dict(export, OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                                                    OTEL_TRACES_SAMPLER_ARG="0.1"))
    logs_info = Service(None, svc.database_url, {"LOG_LEVEL": "info"})
    extras = [traced_all, sampled, logs_info]
    variants = [("off", svc), ("all", traced_all), ("sampled_10pct", sampled), ("logs_info", logs_info)]
    grpc_sink = None
    if os.path.exists(OTLP_SINK_BINARY):
        grpc_addr = f"127.0.0.1:{free_port()}"
        grpc_sink = subprocess.Popen([OTLP_SINK_BINARY, grpc_addr], stdout=subprocess.PIPE, text=True)
        grpc_sink.stdout.readline()
        grpc = Service(None, svc.database_url, dict(export, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{grpc_addr}",
                                                    OTEL_EXPORTER_OTLP_PROTOCOL="grpc"))
        extras.append(grpc)
        variants.insert(2, ("all_grpc", grpc))
    runs = {name: [] for name, _ in variants}
    cpu = {name: [] for name, _ in variants}
    grpc_counts = None
    try:
        for extra_svc in extras:
            extra_svc.start()
        extra = WORKLOADS["get-one"][0]
        for _ in range(2):
            for name, target in variants:
                r, cmd, us = oha_cpu(target, extra, args.duration)
                runs[name].append(r["rps"])
                cpu[name].append(us)
                log(f"  telemetry {name}: {r['rps']:.0f} rps (p99 {r['p99_ms']:.2f} ms), "
                    f"service CPU {us} µs/request")
    finally:
        for extra_svc in extras:
            extra_svc.stop()
        time.sleep(0.5)
        sink.stop()
        if grpc_sink:
            grpc_sink.terminate()
            try:
                out, _ = grpc_sink.communicate(timeout=10)
                grpc_counts = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                grpc_sink.kill()
    off_rps = statistics.mean(runs["off"])

    def cost(name):
        return round(100 * (1 - statistics.mean(runs[name]) / off_rps), 1) if off_rps else None

    def cpu_us(name):
        values = [v for v in cpu[name] if v is not None]
        return round(statistics.mean(values), 1) if values else None

    res["telemetry"] = {"workload": "get-one, oha c=64; LOG_LEVEL=warn unless named",
                        "rps_off": runs["off"], "rps_on": runs["all"],
                        "rps_on_sampled_10pct": runs["sampled_10pct"],
                        "rps_logs_info": runs["logs_info"],
                        "cost_pct": cost("all"), "cost_pct_sampled_10pct": cost("sampled_10pct"),
                        "cost_pct_logs_info": cost("logs_info"),
                        "cpu_us_per_request": {name: cpu_us(name) for name, _ in variants},
                        "sink": sink.counts}
    if "all_grpc" in runs:
        res["telemetry"].update(rps_on_grpc=runs["all_grpc"], cost_pct_grpc=cost("all_grpc"),
                                grpc_sink=grpc_counts)
    log(f"  telemetry costs {cost('all')} % of get-one throughput tracing every request "
        f"(http/protobuf; {cost('all_grpc') if 'all_grpc' in runs else '-'} % over gRPC), "
        f"{cost('sampled_10pct')} % sampling 10 %; logs at info cost {cost('logs_info')} %; "
        f"service CPU µs/request {res['telemetry']['cpu_us_per_request']}; sink got {sink.counts}")


def flood(svc, args, res):
    """2000 simultaneous connections, then /health must answer within 1 s."""
    conc = 2000
    n = 4000 if args.quick else 20000
    retry_after = {"checked": 0, "missing": 0}
    stop = threading.Event()

    def probe():
        # Beside the flood: every refusal must say when to come back.
        while not stop.is_set():
            status, headers, _ = http("GET", svc.url + "/todos?limit=20", timeout=10)
            if status in (429, 503):
                retry_after["checked"] += 1
                if not any(k.lower() == "retry-after" for k in headers):
                    retry_after["missing"] += 1

    prober = threading.Thread(target=probe)
    peak = {"rss_kib": 0}

    def watch():
        while not stop.is_set():
            peak["rss_kib"] = max(peak["rss_kib"], svc.rss_kib() or 0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    prober.start()
    watcher.start()
    try:
        text, cmd = run(OHA + ["-n", str(n), "-c", str(conc), "-t", "10s", "-H", bearer(),
                               svc.url + "/todos?limit=20"], timeout=180)
    finally:
        stop.set()
        prober.join()
        watcher.join()
    r = parse_oha(text)
    ended = time.time()
    healthy_after = None
    while time.time() - ended < 10:
        if http("GET", svc.url + "/health", timeout=2)[0] == 200:
            healthy_after = round(time.time() - ended, 4)
            break
        time.sleep(0.01)
    r.update({"concurrency": conc, "requests": n, "command": cmd, "retry_after": retry_after,
              "healthy_after_s": healthy_after, "peak_rss_mib": round(peak["rss_kib"] / 1024, 1)})
    log(f"  flood: statuses {r['statuses']}, errors {r['errors']}, p99 {r['p99_ms']:.1f} ms, "
        f"healthy after {healthy_after} s, peak RSS {r['peak_rss_mib']} MiB, Retry-After {retry_after}")
    res["flood"] = r


def oha_json(url_args, flags, timeout):
    """oha with the success/failure breakdown; returns its JSON, parsed, and the command shown."""
    cmd = OHA + ["--stats-success-breakdown", "-H", bearer()] + flags + url_args
    text, shown = run(cmd, timeout=timeout)
    return json.loads(text), shown


def goodput(j):
    """200s per second of the run, the p99 of the 200s, and the refusals' shape."""
    statuses = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
    total_s = j["summary"]["total"] or 1e-9
    ok = statuses.get("200", 0)
    p99 = (j.get("latencyPercentilesSuccessful") or {}).get("p99")
    return {"goodput_rps": round(ok / total_s), "wall_s": round(total_s, 2), "statuses": statuses,
            "errors": j.get("errorDistribution") or {},
            "p99_ok_ms": None if p99 is None else round(p99 * 1000, 1)}


def get_one_url(target):
    extra = WORKLOADS["get-one"][0]
    base = target.url.replace(".", "[.]")
    return [a.format(base=base) for a in extra]


def overload(svc, args, res):
    """Goodput when more is asked than the service can do, beside the lean twin in the same run
    (get-one, release build, rate limit out of reach):
    - closed loop: oha -c 2000 -n 20000, each connection sending again as soon as it is answered;
    - open loop: oha -q at twice the service's measured capacity, with latency correction, on
      GET one todo and on the list of 500;
    - what a refusal costs: the service's CPU per 200 at c=64, then per 503 in a run where
      MAX_IN_FLIGHT=1 and MAX_QUEUE_WAIT=0 refuse most requests (solved from the two runs)."""
    if not svc.proc or not os.path.exists(LEAN_TWIN_BINARY):
        res["overload"] = {"skipped": "needs a service this script starts and the built lean twin"}
        log("  overload: skipped (needs a service this script starts and the built lean twin)")
        return
    n = 4000 if args.quick else 20000
    seconds = 3 if args.quick else 10
    out = {"requests": n}
    closed_flags = ["-n", str(n), "-c", "2000", "-t", "10s"]
    j, cmd = oha_json(get_one_url(svc), closed_flags, timeout=180)
    out["closed_service"] = dict(goodput(j), command=cmd)
    twin = Service(None, svc.database_url, binary=LEAN_TWIN_BINARY, ready_path="/todos/1")
    try:
        twin.start()
        j, cmd = oha_json(get_one_url(twin), closed_flags, timeout=180)
        out["closed_twin"] = dict(goodput(j), command=cmd)
    finally:
        twin.stop()
    c, t = out["closed_service"], out["closed_twin"]
    out["closed_ratio"] = round(c["goodput_rps"] / t["goodput_rps"], 2) if t["goodput_rps"] else None
    log(f"  closed loop c=2000: service {c['goodput_rps']} × 200/s (p99 of 200s {c['p99_ok_ms']} ms, "
        f"{c['statuses']}, errors {c['errors']}) vs lean twin {t['goodput_rps']} × 200/s (p99 "
        f"{t['p99_ok_ms']} ms, {t['statuses']}, errors {t['errors']}): {out['closed_ratio']}x")

    # Open loop. oha keeps at most -c requests outstanding; beyond that the overload would pile
    # up in oha's own backlog (counted by --latency-correction), never reaching the service. So
    # each run gets connections enough for Little's law: the offered rate times the longest a
    # request can stay (the queue bound plus service time), with margin. Two workloads: GET one
    # todo, so cheap that a refusal costs a quarter of an answer (and oha sending twice its
    # capacity takes the service's CPU on two cores), and the list of 500, where a refusal is
    # small beside an answer.
    out["open"] = {}
    for name, url_args, wait in (("get-one", get_one_url, "50ms"),
                                 ("list-500", lambda t: [t.url + "/todos?limit=500"], "200ms")):
        open_svc = Service(None, svc.database_url, extra_env={"MAX_QUEUE_WAIT": wait})
        try:
            open_svc.start()
            j, _ = oha_json(url_args(open_svc), ["-z", f"{seconds}s", "-c", "64"], timeout=seconds + 60)
            capacity = goodput(j)["goodput_rps"]
            rate = 2 * capacity
            wait_s = float(wait.rstrip("ms")) / 1000
            conc = min(8000, int(rate * (wait_s + 0.1)) + 500)
            # A number of requests rather than a duration: with -z, oha aborts what is still in
            # flight when time is up (up to rate × (bound + service time) requests), which
            # would count as lost goodput.
            j, cmd = oha_json(url_args(open_svc), ["-n", str(rate * seconds), "-c", str(conc), "-q",
                                                   str(rate), "--latency-correction"],
                              timeout=seconds + 60)
        finally:
            open_svc.stop()
        o = dict(goodput(j), command=cmd, capacity_rps=capacity, offered_rps=rate,
                 max_queue_wait=wait, connections=conc)
        o["ratio_to_capacity"] = round(o["goodput_rps"] / capacity, 2) if capacity else None
        out["open"][name] = o
        log(f"  open loop, {name}, at {rate}/s (2 × capacity {capacity}/s, MAX_QUEUE_WAIT={wait}, "
            f"{conc} connections): {o['goodput_rps']} × 200/s ({o['ratio_to_capacity']}x capacity), "
            f"p99 of 200s {o['p99_ok_ms']} ms, {o['statuses']}, errors {o['errors']}")

    # CPU per answer and per refusal, from two runs of the same length.
    def cpu_run(target):
        before = target.cpu_ticks()
        j, cmd = oha_json(get_one_url(target), ["-z", f"{seconds}s", "-c", "64"], timeout=seconds + 60)
        ticks = target.cpu_ticks() - before
        st = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
        return ticks * 1e6 / os.sysconf("SC_CLK_TCK"), st.get("200", 0), st.get("503", 0), cmd

    cpu_ok, ok, _, _ = cpu_run(svc)
    per_ok = cpu_ok / ok if ok else None
    shedding = Service(None, svc.database_url, extra_env={"MAX_IN_FLIGHT": "1", "MAX_QUEUE_WAIT": "0"})
    try:
        shedding.start()
        cpu_mix, ok2, refused, cmd = cpu_run(shedding)
    finally:
        shedding.stop()
    per_refusal = ((cpu_mix - ok2 * per_ok) / refused) if (refused and per_ok) else None
    # The floor beside it: the lean twin (axum, hyper, no middleware) answering a path it does not
    # route, a 404 with no work behind it. No refusal through the same server can cost less.
    twin = Service(None, svc.database_url, binary=LEAN_TWIN_BINARY, ready_path="/todos/1")
    try:
        twin.start()
        before = twin.cpu_ticks()
        j, _ = oha_json([twin.url + "/not/routed"], ["-z", f"{seconds}s", "-c", "64"],
                        timeout=seconds + 60)
        ticks = twin.cpu_ticks() - before
    finally:
        twin.stop()
    answered = sum((j.get("statusCodeDistribution") or {}).values())
    floor = ticks * 1e6 / os.sysconf("SC_CLK_TCK") / answered if answered else None
    out["cpu_us"] = {"per_200": None if per_ok is None else round(per_ok, 1),
                     "per_503": None if per_refusal is None else round(per_refusal, 1),
                     "twin_404_floor": None if floor is None else round(floor, 1),
                     "refusals_in_run": refused, "command": cmd}
    ratio = lambda x: f"{x / per_ok:.2f}" if (x is not None and per_ok) else "–"
    log(f"  CPU: {out['cpu_us']['per_200']} µs per 200, {out['cpu_us']['per_503']} µs per 503 "
        f"({ratio(per_refusal)} of a 200; {refused} refusals); the lean twin's 404, the floor: "
        f"{out['cpu_us']['twin_404_floor']} µs ({ratio(floor)})")
    res["overload"] = out


def outage(svc, args, res):
    """Steady load while PostgreSQL is stopped for 10 s, then started: a per-second timeline."""
    pg = Postgres()
    if not pg.available():
        log("  outage: skipped (needs the throwaway PostgreSQL that run.sh starts)")
        res["outage"] = {"skipped": "needs the throwaway PostgreSQL run.sh starts"}
        return
    before, down, after = (3, 10, 6) if args.quick else (5, 10, 10)
    total = before + down + after
    events = []  # (t, status, latency)
    t0 = time.time()
    stop = threading.Event()

    def client():
        while not stop.is_set():
            start = time.time()
            status = http("GET", svc.url + "/todos/1", timeout=5)[0]
            events.append((start - t0, status, time.time() - start))
            time.sleep(0.005)

    pool = [threading.Thread(target=client) for _ in range(8)]
    for t in pool:
        t.start()
    try:
        time.sleep(before)
        stopped_at = time.time() - t0
        pg.stop()
        time.sleep(max(0, before + down - (time.time() - t0)))
        started_at = time.time() - t0
        pg.start()
        time.sleep(max(0, total - (time.time() - t0)))
    finally:
        stop.set()
        for t in pool:
            t.join()
    timeline = {}
    for t, status, _ in events:
        sec = timeline.setdefault(int(t), {})
        sec[str(status)] = sec.get(str(status), 0) + 1
    first_503 = next((t for t, s, _ in sorted(events) if t >= stopped_at and s == 503), None)
    recovered = next((t for t, s, _ in sorted(events) if t >= started_at and s == 200), None)
    during = [lat for t, s, lat in events if stopped_at <= t < started_at]
    r = {
        "stopped_at_s": round(stopped_at, 2), "started_at_s": round(started_at, 2),
        "time_to_first_503_s": None if first_503 is None else round(first_503 - stopped_at, 3),
        "time_to_recovery_s": None if recovered is None else round(recovered - started_at, 3),
        "p99_ms_while_down": round(sorted(during)[int(0.99 * (len(during) - 1))] * 1000, 1) if during else None,
        "timeline": {str(k): timeline[k] for k in sorted(timeline)},
        "command": "8 Python clients GET /todos/1 in a loop; pg_ctl stop -m fast; pg_ctl start",
    }
    log(f"  outage: first 503 {r['time_to_first_503_s']} s after the stop, recovered "
        f"{r['time_to_recovery_s']} s after the start, p99 while down {r['p99_ms_while_down']} ms")
    res["outage"] = r


# --- report -----------------------------------------------------------------------------------

def soak(svc, args, res):
    """The mixed 80/20 load for --soak seconds with the service's resident memory sampled every
    second: memory must level off, not climb. Growth is judged on the second half (after pools,
    caches and allocator arenas have warmed up): its least-squares slope and first-to-last change."""
    seconds = args.soak
    samples = []
    stop = threading.Event()

    def watch():
        started = time.time()
        while not stop.wait(1.0):
            kib = svc.rss_kib()
            if kib is not None:
                samples.append((round(time.time() - started, 1), round(kib / 1024, 1)))

    watcher = threading.Thread(target=watch)
    results = {}

    def go(key, extra, conc):
        results[key] = oha(svc, extra, seconds, conc)

    seed(svc.database_url, args.rows)
    threads = [threading.Thread(target=go, args=("read", WORKLOADS["get-one"][0], 51)),
               threading.Thread(target=go, args=("write", WORKLOADS["post"][0], 13))]
    watcher.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        watcher.join()
    read, write = results["read"][0], results["write"][0]
    out = {"seconds": seconds, "read": read, "write": write,
           "commands": [results["read"][1], results["write"][1]], "rss_mib": samples}
    if len(samples) >= 4:
        half = samples[len(samples) // 2:]
        xs, ys = [t for t, _ in half], [m for _, m in half]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        out.update({"rss_mib_max": max(m for _, m in samples),
                    "rss_mib_second_half_first": ys[0], "rss_mib_last": ys[-1],
                    "rss_mib_per_min_second_half": round(slope * 60, 3)})
        log(f"  soak {seconds} s: {read['rps'] + write['rps']:.0f} rps, non-2xx "
            f"{read['non_2xx'] + write['non_2xx']}; RSS max {out['rss_mib_max']} MiB, second half "
            f"{ys[0]} -> {ys[-1]} MiB ({out['rss_mib_per_min_second_half']:+} MiB/min)")
    else:
        log(f"  soak {seconds} s: {read['rps'] + write['rps']:.0f} rps (too short, or no RSS: "
            f"an external --url service)")
    res["soak"] = out


def machine():
    def cmd(c):
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split()[1] + " kB"
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "oha": cmd(["oha", "--version"]), "ab": cmd(["ab", "-V"]),
            "pgbench": cmd([os.path.join(os.environ["PG_BIN"], "pgbench"), "--version"])}


def summary(res):
    lines = [f"# Load test {res['started']}", "",
             f"commit `{res['commit']}`, {res['machine']['cpus']} CPUs ({res['machine']['cpu']}), "
             f"{'quick' if res['quick'] else 'full'} run", ""]
    if "sustained" in res:
        lines += ["| workload (c=64) | service rps | p50 ms | p99 ms | non-2xx | CPU µs/req | pgbench tps | pgbench p99 ms | ratio | to the twin (rps, p99) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, w in res["sustained"]["workloads"].items():
            h, b = w["http"], w.get("pgbench")
            f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
            non2xx = h.get("non_2xx", (h.get("read") or {}).get("non_2xx", 0) + (h.get("write") or {}).get("non_2xx", 0))
            twin = (f"{w['ratio_to_twin']}×, {w['p99_to_twin']}×" if w.get("ratio_to_twin") is not None else "–")
            lines.append(f"| {name} | {f(h['rps'], 0)} | {f(h.get('p50_ms'), 2)} | {f(h.get('p99_ms'), 2)} | {non2xx} | "
                         f"{f(w.get('cpu_us_per_request'))} | "
                         f"{f(b['tps'], 0) if b else '–'} | {f(b['p99_ms'], 2) if b else '–'} | "
                         f"{f(w.get('ratio_to_pgbench'), 2)} | {twin} |")
        lines.append("")
    if "steps" in res:
        lines += ["| ab concurrency | rps | p50 ms | p99 ms | failed | non-2xx |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['concurrency']} | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} | {s['failed']} | {s['non_2xx']} |"
                  for s in res["steps"]]
        lines.append("")
    if "spike" in res:
        lines.append("Spike (120 × curl, 5 rounds): " + "; ".join(
            f"{r['statuses']} in {r['wall_s']} s" for r in res["spike"]["rounds"]))
        lines.append("")
    if "compression" in res:
        c = res["compression"]["summary"]
        lines.append("Compression (GET /todos?limit=100, c=64, interleaved): " + "; ".join(
            f"{k} {v['rps']:.0f} rps, {v['cpu_us_per_request']} µs CPU, {v['bytes_per_request']:.0f} B ({v['ratio']}×)"
            for k, v in c.items()))
        lines.append("")
    if "auth" in res and "skipped" not in res["auth"]:
        a = res["auth"]
        lines.append(f"Authentication (get-one, c=64, interleaved): HS256 bearer token "
                     f"{statistics.mean(a['rps_jwt']):.0f} rps, none {statistics.mean(a['rps_none']):.0f} rps "
                     f"(ratio {a['rps_ratio']}); service CPU {a['cpu_us_per_request']['jwt']} vs "
                     f"{a['cpu_us_per_request']['none']} µs/request: verification "
                     f"+{a['verification_cpu_us']} µs/request.")
    if "db_tls" in res and "skipped" not in res["db_tls"]:
        d = res["db_tls"]
        lines.append(f"TLS to PostgreSQL (get-one, c=64, interleaved, sslmode=require vs disable): "
                     f"service {statistics.mean(d['rps']['tls']):.0f} vs {statistics.mean(d['rps']['plain']):.0f} rps "
                     f"(ratio {d['service_ratio']}), pgbench {statistics.mean(d['pgbench_tps']['tls']):.0f} vs "
                     f"{statistics.mean(d['pgbench_tps']['plain']):.0f} tps (ratio {d['pgbench_ratio']}); "
                     f"service CPU {d['cpu_us_per_request']['tls']} vs {d['cpu_us_per_request']['plain']} µs/request.")
    if "pooler" in res and "skipped" not in res["pooler"]:
        p = res["pooler"]
        lines.append(f"Through PgBouncer (c=64, interleaved; {p['poolers']['transaction']} with "
                     f"DB_POOLER_MODE=transaction, {p['poolers']['transaction_prepared']} with "
                     f"transaction-prepared), throughput against direct:")
        for workload, d in p["workloads"].items():
            mean = {k: f"{statistics.mean(v):.0f}" for k, v in d["rps"].items()}
            lines.append(f"- {workload}: service direct {mean['direct']} rps; transaction "
                         f"{d['service_ratio']['transaction']}×, transaction-prepared "
                         f"{d['service_ratio']['transaction_prepared']}×; pgbench -M extended "
                         f"{d['pgbench_ratio']['transaction']}× and "
                         f"{d['pgbench_ratio']['transaction_prepared']}×; service CPU µs/request "
                         + ", ".join(f"{k} {v}" for k, v in d["cpu_us_per_request"].items()) + ".")
    if "telemetry" in res and "skipped" not in res["telemetry"]:
        t = res["telemetry"]
        lines.append(f"Telemetry (get-one, c=64, interleaved): export off {statistics.mean(t['rps_off']):.0f} rps; "
                     f"every request traced {statistics.mean(t['rps_on']):.0f} rps (cost {t['cost_pct']} %"
                     + (f"; over gRPC {statistics.mean(t['rps_on_grpc']):.0f} rps, cost {t['cost_pct_grpc']} %"
                        if "rps_on_grpc" in t else "") + "); "
                     f"10 % sampled {statistics.mean(t['rps_on_sampled_10pct']):.0f} rps "
                     f"(cost {t['cost_pct_sampled_10pct']} %); no export but LOG_LEVEL=info "
                     f"{statistics.mean(t['rps_logs_info']):.0f} rps (cost {t['cost_pct_logs_info']} %); "
                     "service CPU per request "
                     + ", ".join(f"{k} {v} µs" for k, v in t["cpu_us_per_request"].items())
                     + "; the receiver got "
                     + ", ".join(f"{k} {v['requests']} requests / {v['bytes'] // 1024} KiB"
                                 for k, v in sorted(t["sink"].items())))
        lines.append("")
    if "flood" in res:
        fl = res["flood"]
        lines.append(f"Flood (oha -c 2000, {fl['requests']} requests): statuses {fl['statuses']}, "
                     f"connection errors {fl['errors'] or 0}, p99 {fl['p99_ms']:.1f} ms, healthy "
                     f"{fl['healthy_after_s']} s after, peak RSS {fl['peak_rss_mib']} MiB, "
                     f"Retry-After missing on {fl['retry_after']['missing']} of "
                     f"{fl['retry_after']['checked']} refusals")
        lines.append("")
    if "overload" in res and "skipped" not in res["overload"]:
        o = res["overload"]
        c, t, cpu = o["closed_service"], o["closed_twin"], o["cpu_us"]
        lines.append(f"Overload, get-one: closed loop (oha -c 2000 -n {o['requests']}) service "
                     f"{c['goodput_rps']} × 200/s (p99 of the 200s {c['p99_ok_ms']} ms, {c['statuses']}, "
                     f"errors {c['errors'] or 0}) vs lean twin {t['goodput_rps']} × 200/s (p99 "
                     f"{t['p99_ok_ms']} ms): {o['closed_ratio']}x; CPU {cpu['per_200']} µs per 200, "
                     f"{cpu['per_503']} µs per 503 (the lean twin's 404, the floor: "
                     f"{cpu.get('twin_404_floor')} µs)")
        lines.append("")
        for name, op in o["open"].items():
            lines.append(f"Overload, open loop, {name}: at {op['offered_rps']}/s (2 × capacity "
                         f"{op['capacity_rps']}/s, MAX_QUEUE_WAIT={op['max_queue_wait']}, "
                         f"{op['connections']} connections): {op['goodput_rps']} × 200/s "
                         f"({op['ratio_to_capacity']}x capacity), p99 of the 200s {op['p99_ok_ms']} ms, "
                         f"{op['statuses']}")
            lines.append("")
    if "soak" in res and "rss_mib_max" in res["soak"]:
        k = res["soak"]
        lines.append(f"Soak (mixed 80/20 for {k['seconds']} s): "
                     f"{k['read']['rps'] + k['write']['rps']:.0f} rps, non-2xx "
                     f"{k['read']['non_2xx'] + k['write']['non_2xx']}; RSS max {k['rss_mib_max']} MiB, "
                     f"second half {k['rss_mib_second_half_first']} -> {k['rss_mib_last']} MiB "
                     f"({k['rss_mib_per_min_second_half']:+} MiB/min)")
        lines.append("")
    if "outage" in res and "skipped" not in res["outage"]:
        o = res["outage"]
        lines.append(f"Outage (PostgreSQL stopped 10 s): first 503 {o['time_to_first_503_s']} s after "
                     f"the stop, recovered {o['time_to_recovery_s']} s after the start, p99 while "
                     f"down {o['p99_ms_while_down']} ms")
        lines.append("")
    return "\n".join(lines)


def plots(res, stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if "steps" in res:
        c = [s["concurrency"] for s in res["steps"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(c, [s["rps"] for s in res["steps"]], "o-", label="requests/s")
        ax.set_xscale("log")
        ax.set_xlabel("ab concurrency")
        ax.set_ylabel("requests/s")
        ax2 = ax.twinx()
        ax2.plot(c, [s["p99_ms"] for s in res["steps"]], "s--", color="tab:red", label="p99 ms")
        ax2.set_ylabel("p99 latency (ms)")
        ax.set_title("GET /todos?limit=20: throughput and p99 vs concurrency")
        fig.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(stem + "-steps.png", dpi=100)
        made.append(stem + "-steps.png")
    if "outage" in res and "timeline" in res["outage"]:
        o = res["outage"]
        secs = sorted(int(k) for k in o["timeline"])
        codes = sorted({c for v in o["timeline"].values() for c in v})
        fig, ax = plt.subplots(figsize=(8, 4))
        bottom = [0] * len(secs)
        for code in codes:
            vals = [o["timeline"][str(s)].get(code, 0) for s in secs]
            ax.bar(secs, vals, bottom=bottom, label=code)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axvspan(o["stopped_at_s"], o["started_at_s"], color="grey", alpha=0.2, label="Postgres down")
        ax.set_xlabel("second")
        ax.set_ylabel("responses")
        ax.set_title("Outage: responses per second by status")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem + "-outage.png", dpi=100)
        made.append(stem + "-outage.png")
    if res.get("soak", {}).get("rss_mib"):
        t, m = zip(*res["soak"]["rss_mib"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(t, m)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("second")
        ax.set_ylabel("resident memory (MiB)")
        ax.set_title(f"Soak: service RSS under mixed 80/20 load, {res['soak']['seconds']} s")
        fig.tight_layout()
        fig.savefig(stem + "-soak.png", dpi=100)
        made.append(stem + "-soak.png")
    return made


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: about two minutes in all")
    p.add_argument("--duration", type=int, help="seconds per sustained workload (default 20, quick 3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds of the side-by-side scenarios (db_tls, pooler; default 2)")
    p.add_argument("--soak", type=int, help="seconds of the soak (memory growth) run (default 600, quick 10)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (baseline runs with sustained)")
    p.add_argument("--url", help="a running service (127.0.0.1 only); its database must be DATABASE_URL")
    p.add_argument("--rows", type=int, default=10000, help="todos seeded before the runs")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    args.duration = args.duration or (3 if args.quick else 20)
    args.soak = args.soak or (10 if args.quick else 600)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS + ["baseline"]]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    if "baseline" in chosen and "sustained" not in chosen:
        chosen.append("sustained")
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        p.error("DATABASE_URL is not set (run through loadtest/run.sh)")
    if args.url and not re.match(r"^http://127\.0\.0\.1:\d+/?$", args.url):
        p.error("--url must be http://127.0.0.1:PORT: load tests target this machine only")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.url:
        # A service started elsewhere verifies with its own secret: this environment must have it.
        if not os.environ.get("AUTH_JWT_SECRET"):
            p.error("--url needs the service's AUTH_JWT_SECRET in the environment (AUTH_MODE=jwt)")
        global AUTH_SECRET
        AUTH_SECRET = os.environ["AUTH_JWT_SECRET"]
    mint_token(SERVICE_BINARY)
    svc = Service(args.url.rstrip("/") if args.url else None, database_url)
    res = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "quick": args.quick, "scenarios": chosen, "rows": args.rows}
    res["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip()
    res["machine"] = machine()
    try:
        if not args.url:
            svc.start()
        log(f"service at {svc.url}; seeding {args.rows} todos")
        seed(database_url, args.rows)
        res["rss_mib_idle"] = round((svc.rss_kib() or 0) / 1024, 1)
        for name in SCENARIOS:
            if name in chosen:
                log(f"== {name}")
                globals()[name](svc, args, res)
        res["rss_mib_end"] = round((svc.rss_kib() or 0) / 1024, 1)
    finally:
        svc.stop()
        for proc in STARTED:
            if proc.poll() is None:
                proc.kill()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, res["started"].replace(":", ""))
    res["plots"] = [os.path.basename(x) for x in plots(res, stem)]
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    text = summary(res)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"results: {stem}.json, {stem}.md" + "".join(f", {os.path.join(args.out, x)}" for x in res["plots"]))


if __name__ == "__main__":
    main()
