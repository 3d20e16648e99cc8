"""The upgrade drill of scripts/cluster.sh: the cluster starts on the previous release (built by
scripts/build-previous-release.sh from the commit before the newest migration) and, under load,
each replica in turn is replaced by this release, whose first start applies the pending
migration while the others still serve. A module of its own because it is one job: cluster.py
starts and stops the pieces, this judges a rolling upgrade.

What it asserts, as a client would see it: no failed request but 503s with Retry-After, no keyed
create refused or applied twice, and no lost update: PATCHes with If-Match contend for a few todos,
and no two are acknowledged against the same version (one overwriting the other unseen), and each
todo ends with the content of the last PATCH acknowledged for it. It also reports the longest any
session waited on a lock (pg_stat_activity, sampled every 50 ms) and which release and schema each
replica reported before and after (admin /ready).
"""

import http.client
import json
import random
import signal
import subprocess
import threading
import time


def admin_ready(r):
    """(release, schema expected, schema applied) from a replica's admin /ready."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", r["admin_port"], timeout=5)
        conn.request("GET", "/ready")
        body = json.loads(conn.getresponse().read())
        conn.close()
    except (OSError, ValueError, http.client.HTTPException) as e:
        return (f"unreadable: {type(e).__name__}", None, None)
    schema = body.get("checks", {}).get("database", {}).get("schema", {})
    return (body.get("release"), schema.get("expected"), schema.get("applied"))


class Patchers:
    """Clients that read a todo and PATCH it with If-Match, a few todos shared by all, so that
    their updates contend. Records every acknowledged PATCH with the version it was based on."""

    def __init__(self, c, state, tok, targets, clients=4):
        self.c, self.port, self.auth = c, state["haproxy"]["port"], f"Bearer {tok}"
        self.targets, self.clients = targets, clients
        self.acked = []  # (todo, base etag, new etag, title, t_end)
        self.answers = {}  # status -> count
        self.failures = []  # (status, retry_after, what)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = []

    def call(self, conn, method, path, headers, body=None):
        headers = dict(headers, Authorization=self.auth)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
            return r.status, r.getheader("etag"), r.getheader("retry-after"), payload
        except (OSError, http.client.HTTPException):
            conn.close()
            return 0, None, None, b""

    def worker(self, n):
        rng = random.Random(1000 + n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.c.CLIENT_TIMEOUT)
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            todo = rng.choice(self.targets)
            st, base, ra, _ = self.call(conn, "GET", f"/todos/{todo}", {})
            if st != 200:
                self.note(st, ra, "GET")
                time.sleep(0.05)
                continue
            title = f"patch {n}-{i}"
            st, etag, ra, _ = self.call(conn, "PATCH", f"/todos/{todo}", {"If-Match": base},
                                        {"title": title})
            with self.lock:
                self.answers[st] = self.answers.get(st, 0) + 1
                if st == 200:
                    self.acked.append((todo, base, etag, title, time.monotonic()))
            if st not in (200, 412):
                self.note(st, ra, "PATCH")
                time.sleep(0.05)

    def note(self, st, ra, what):
        with self.lock:
            self.failures.append((st, ra, what))

    def start(self):
        self.threads = [threading.Thread(target=self.worker, args=(n,), daemon=True)
                        for n in range(self.clients)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.c.CLIENT_TIMEOUT + 5)

    def lost_updates(self, final):
        """PATCHes acknowledged against a version another acknowledged PATCH had already been
        based on, and todos whose final content is not their last acknowledged PATCH's."""
        seen, lost = set(), 0
        for todo, base, _, _, _ in self.acked:
            lost += (todo, base) in seen
            seen.add((todo, base))
        for todo, (etag, title) in final.items():
            mine = [a for a in self.acked if a[0] == todo]
            if mine and not any(a[2] == etag and a[3] == title for a in mine):
                lost += 1
        return lost


class LockWaits:
    """The longest any session has been waiting on a lock, sampled every 50 ms by one psql
    session's \\watch (the query's age bounds the wait from above)."""

    QUERY = ("SELECT coalesce(round(max(extract(epoch FROM clock_timestamp() - query_start)) * 1000), 0)"
             " FROM pg_stat_activity WHERE wait_event_type = 'Lock';")

    def __init__(self, c, port):
        self.proc = subprocess.Popen(
            [c.pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "todos",
             "-qtAX"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        self.proc.stdin.write(self.QUERY + "\n\\watch 0.05\n")
        self.proc.stdin.flush()
        self.max_ms = 0
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line.isdigit():
                self.max_ms = max(self.max_ms, int(line))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        return self.max_ms


def final_state(c, state, targets):
    """Each target todo's ETag and title, read straight from the writer."""
    rows = c.psql(state[state["writer"]]["port"],
                  "SELECT id, version, title FROM todos WHERE id IN (%s)" % ",".join(map(str, targets)))
    out = {}
    for line in rows.splitlines():
        todo, version, title = line.split("|", 2)
        out[int(todo)] = (f'"{version}"', title)
    return out


def drill(c, state, tok, load, checks):
    log = c.log
    log("\n== upgrade: every replica replaced in turn by this release (SIGTERM: not-ready, drain; "
        "the new binary's first start applies the pending migration while the others serve), under "
        "reads, lists, keyed creates and contending PATCHes with If-Match")
    before = {r["name"]: admin_ready(r) for r in state["replicas"]}
    for name, (release, expected, applied) in before.items():
        log(f"    {name} before: release {release}, schema expected {expected}, applied {applied}")
    targets = load.known[:4]
    patchers = Patchers(c, state, tok, targets)
    waits = LockWaits(c, state[state["writer"]]["port"])
    patchers.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    steps = []
    for r in state["replicas"]:
        t = time.monotonic()
        c.replica_stop(r, signal.SIGTERM)
        r["binary"] = c.BINARY
        c.replica_start(state, r)
        ready = time.monotonic() - t
        c.wait_haproxy(state, r["name"], "UP")
        steps.append({"replica": r["name"], "ready_s": round(ready, 2),
                      "in_haproxy_s": round(time.monotonic() - t, 2)})
        log(f"    {r['name']}: this release ready {ready:.2f} s after SIGTERM, in HAProxy "
            f"{time.monotonic() - t:.2f} s")
    time.sleep(1.0)
    t1 = time.monotonic()
    patchers.stop()
    lock_wait_ms = waits.stop()
    c.save_state(state)
    after = {r["name"]: admin_ready(r) for r in state["replicas"]}
    for name, (release, expected, applied) in after.items():
        log(f"    {name} after:  release {release}, schema expected {expected}, applied {applied}")

    records = load.between(t0, t1)
    t = c.tally(records)
    # 503 with Retry-After is the contract while a replica is out; anything else is a failure.
    failed = [r for r in records if not 200 <= r[3] < 300 and not (r[3] == 503 and r[4])]
    refused_creates = [r for r in failed if r[2] == "POST"]
    patch_failed = [f for f in patchers.failures if not (f[0] == 503 and f[1])]
    lost = patchers.lost_updates(final_state(c, state, targets))
    twice = c.applied_twice(state)
    log(f"    {t}")
    log(f"    PATCH with If-Match: {patchers.answers} ({len(patchers.acked)} acknowledged); "
        f"lost updates {lost}; longest lock wait {lock_wait_ms} ms")
    checks.expect(not failed and not patch_failed,
                  f"upgrade: 0 failed requests but 503s with Retry-After ({len(failed)} + "
                  f"{len(patch_failed)} PATCH/GET of {len(records)})")
    checks.expect(not refused_creates, f"upgrade: no keyed create refused ({len(refused_creates)})")
    checks.expect(twice == 0, f"upgrade: no keyed create applied twice ({twice})")
    checks.expect(lost == 0 and len(patchers.acked) > 0,
                  f"upgrade: no lost update ({lost} of {len(patchers.acked)} acknowledged PATCHes)")
    new = {a[0] for a in after.values()}
    checks.expect(len(new) == 1 and all(a[1] == a[2] for a in after.values()),
                  f"upgrade: every replica on this release and the schema it expects ({sorted(map(str, new))})")
    return {"seconds": round(t1 - t0, 2), "steps": steps, "before": before, "after": after,
            "patch": {"answers": {str(k): v for k, v in patchers.answers.items()},
                      "acknowledged": len(patchers.acked), "lost_updates": lost},
            "longest_lock_wait_ms": lock_wait_ms, "applied_twice": twice,
            "refused_creates": len(refused_creates), **t}
