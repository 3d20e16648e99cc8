#!/usr/bin/env python3
"""Side-by-side CPU cost of services: builds, configurations, or the lean twin
(examples/lean_service.rs) against the service.

On a 2-core machine shared by the load generator, the service and PostgreSQL, throughput swings by
a third over minutes; the service's own CPU per request (utime + stime from /proc/<pid>/stat,
divided by the requests oha completed) is the steadier figure. So every variant runs at once on its
own port, and `oha -c 64` is rotated over them ROUNDS times (drift hits all alike); medians are
printed.

    DATABASE_URL=postgres://…/todos loadtest/compare.py \\
        service=target/release/todo-service \\
        info=target/release/todo-service:LOG_LEVEL=info \\
        lean=target/release/examples/lean_service

Each argument is NAME=BINARY[:VAR=VALUE,...]. Every variant gets DATABASE_URL, LISTEN_ADDR, a
rate limit out of reach (all load comes from one IP), LOG_LEVEL=warn and OTEL_SDK_DISABLED=true
unless overridden. The database must be migrated and seeded (`loadtest/run.sh` leaves it so when
given DATABASE_URL). Options: --rounds N (6), --seconds S per run (3), --path (GET one todo:
/todos/[1-9][0-9]{0,2}, an oha --rand-regex-url pattern), --post (POST /todos with a one-field
body instead of the GET; each request adds a row). Targets 127.0.0.1 only.

--instructions N counts instead of timing: each variant runs under valgrind's callgrind, is warmed
up with 500 requests, then serves N (oha -c 8) while callgrind counts the user-space instructions
it executes (its own code, libraries, allocator; not the kernel). On a noisy machine the CPU
figures above move by ±15 % between runs; this count repeats within ~1 %, so it shows a change of
a few hundred instructions per request that timing cannot. Needs valgrind (apt-get install -y
valgrind); ~1 minute per variant. --keep DIR keeps the dumps, for callgrind_annotate. With
--refusals each variant runs again with MAX_IN_FLIGHT=1 MAX_QUEUE_WAIT=0, which refuses most
requests with admission's 503, and the instructions per refusal are solved from the two runs.
"""

import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import secrets
import tempfile
import time
import urllib.error
import urllib.request

# The variants run authenticated, as loadtest/run.py runs the service: one caller, the owner of the
# rows run.sh seeded.
OWNER = "loadtest"
SECRET = secrets.token_urlsafe(48)
TOKEN = {"value": None}


def mint_token(binary):
    TOKEN["value"] = subprocess.run([binary, "token", "--sub", OWNER, "--ttl", "12h"],
                                    env=dict(os.environ, AUTH_JWT_SECRET=SECRET), check=True,
                                    capture_output=True, text=True, timeout=30).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_until_answering(port, proc, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"a variant on port {port} exited during startup")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return
        except urllib.error.HTTPError:
            # Any HTTP answer means it serves: the lean twin has no /health and answers 404.
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"a variant on port {port} did not answer within 30 s")


def variant_env(database_url, port, overrides):
    env = dict(os.environ, DATABASE_URL=database_url, LISTEN_ADDR=f"127.0.0.1:{port}",
               ADMIN_LISTEN_ADDR="127.0.0.1:0",
               RATE_LIMIT_PER_SECOND="1000000", RATE_LIMIT_BURST="1000000",
               LOG_LEVEL="warn", OTEL_SDK_DISABLED="true",
               AUTH_MODE="jwt", AUTH_JWT_SECRET=SECRET)
    for kv in filter(None, overrides.split(",")):
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def parse_variant(spec):
    name, _, rest = spec.partition("=")
    binary, _, overrides = rest.partition(":")
    if not name or not binary:
        sys.exit(f"not NAME=BINARY[:VAR=VALUE,...]: {spec}")
    return name, binary, overrides


POST_ARGS = ["-m", "POST", "-H", "content-type: application/json", "-d", '{"title": "load test"}']


def oha(port, args, *limits):
    """One oha run of the workload `args` selects (--path GET, or --post)."""
    request = POST_ARGS if args.post else []
    path = "/todos" if args.post else args.path
    return subprocess.run(
        # --disable-compression: oha asks for gzip and br by default; the variants are compared
        # uncompressed, as the lean twin answers.
        ["oha", "--no-tui", "--output-format", "json", "--disable-compression", *request, *limits,
         "-H", f"authorization: Bearer {TOKEN['value']}",
         "--rand-regex-url", f"http://127[.]0[.]0[.]1:{port}{path}"],
        capture_output=True, text=True, timeout=600, check=True).stdout


def workload(args):
    return "POST /todos" if args.post else f"GET {args.path}"


def callgrind_run(name, binary, overrides, args, database_url, refusals=False):
    """Instructions the variant executed while serving the counted requests, and their
    statuses. Every answer must be 2xx, or with `refusals` 2xx or 503."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
             "--dump-instr=no", binary],
            env=variant_env(database_url, port, overrides),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_answering(port, proc, 120)
            oha(port, args, "-n", "500", "-c", "8")
            # Startup and warm-up (connections, statement caches, allocator arenas) are
            # dropped; only the requests below are counted.
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True, timeout=60)
            result = json.loads(oha(port, args, "-n", str(args.instructions), "-c", "8"))
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                           capture_output=True, timeout=60)
        finally:
            proc.kill()
            proc.wait()
        statuses = {str(k): v for k, v in (result.get("statusCodeDistribution") or {}).items()}
        allowed = ("2", "503") if refusals else ("2",)
        if not sum(statuses.values()) or any(not code.startswith(allowed) for code in statuses):
            sys.exit(f"{name}: unexpected answers: {statuses}")
        dumps = glob.glob(f"{out}/cg.*.1")
        if not dumps:
            sys.exit(f"{name}: callgrind wrote no dump")
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            suffix = "-shedding" if refusals else ""
            shutil.copy(dumps[0], os.path.join(args.keep, f"{name}{suffix}.callgrind"))
        with open(dumps[0]) as f:
            total = next(int(line.split()[1]) for line in f
                         if line.startswith(("summary:", "totals:")))
    return total, statuses


def count_instructions(args, database_url):
    print(f"{workload(args)}, {args.instructions} requests (oha -c 8) per variant under callgrind")
    for spec in args.variants:
        name, binary, overrides = parse_variant(spec)
        total, statuses = callgrind_run(name, binary, overrides, args, database_url)
        done = sum(statuses.values())
        per_ok = total / done
        print(f"{name:>16}: {per_ok:8.0f} instructions per request ({done} requests)")
        if not args.refusals:
            continue
        # Solved from a second run where one slot and no wait refuse most requests: what the
        # 2xx in it cost is known from the run above.
        shedding = ",".join(filter(None, [overrides, "MAX_IN_FLIGHT=1", "MAX_QUEUE_WAIT=0"]))
        total, statuses = callgrind_run(name, binary, shedding, args, database_url, refusals=True)
        refused = statuses.get("503", 0)
        ok = sum(v for k, v in statuses.items() if k.startswith("2"))
        if not refused:
            print(f"{name:>16}: no request was refused in the shedding run ({statuses})")
            continue
        per_refusal = (total - ok * per_ok) / refused
        print(f"{name:>16}: {per_refusal:8.0f} instructions per 503 ({refused} refused, {ok} served"
              f" in the shedding run): {per_refusal / per_ok:.2f} of a served request")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="NAME=BINARY[:VAR=VALUE,...]")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--path", default="/todos/[1-9][0-9]{0,2}")
    p.add_argument("--post", action="store_true", help="POST /todos instead of the GET")
    p.add_argument("--instructions", type=int, metavar="N",
                   help="count user-space instructions per request over N requests (callgrind)")
    p.add_argument("--refusals", action="store_true",
                   help="with --instructions: also what a 503 from admission costs (MAX_IN_FLIGHT=1 "
                        "MAX_QUEUE_WAIT=0; solved from a second run)")
    p.add_argument("--keep", metavar="DIR",
                   help="with --instructions: keep each variant's dump as DIR/NAME.callgrind")
    args = p.parse_args()
    if args.instructions and not shutil.which("valgrind"):
        sys.exit("--instructions needs valgrind: apt-get install -y valgrind")
    database_url = os.environ.get("DATABASE_URL") or sys.exit("DATABASE_URL is not set")
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    mint_token(parse_variant(args.variants[0])[1])

    if args.instructions:
        return count_instructions(args, database_url)
    variants = {}
    try:
        for spec in args.variants:
            name, binary, overrides = parse_variant(spec)
            port = free_port()
            proc = subprocess.Popen([binary], env=variant_env(database_url, port, overrides),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            variants[name] = (proc, port)
            wait_until_answering(port, proc)

        cpu = {name: [] for name in variants}
        rps = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (proc, port) in variants.items():
                before = cpu_ticks(proc.pid)
                out = oha(port, args, "-z", f"{args.seconds}s", "-c", "64")
                after = cpu_ticks(proc.pid)
                result = json.loads(out)
                statuses = result.get("statusCodeDistribution") or {}
                done = sum(statuses.values())
                if not done or any(not str(code).startswith("2") for code in statuses):
                    sys.exit(f"{name}: not every answer was 2xx: {statuses}")
                cpu[name].append((after - before) / ticks_per_s * 1e6 / done)
                rps[name].append(result["summary"]["requestsPerSec"])
        print(f"{workload(args)}, oha -c 64, {args.seconds} s × {args.rounds} rounds per variant, medians")
        for name in variants:
            print(f"{name:>16}: {statistics.median(cpu[name]):5.1f} µs service CPU per request "
                  f"(runs {', '.join(f'{v:.0f}' for v in cpu[name])}), "
                  f"{statistics.median(rps[name]):.0f} rps")
    finally:
        for proc, _ in variants.values():
            proc.terminate()
        for proc, _ in variants.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
