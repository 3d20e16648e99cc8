"""The edge-limit drill of scripts/cluster.sh: a second HAProxy, from the shipped configuration
(deploy/compose/haproxy.cfg) with a low EDGE_RATE_LIMIT_PER_SECOND, in front of the same three
replicas; one client sends at three times that rate from 127.0.0.2 and another at a quarter of it
from 127.0.0.3, both open loop, for a few seconds. A module of its own because it is one job:
cluster.py starts and stops the pieces, this judges the balancer's per-client rate.

What it asserts: the fast client gets at most its rate (plus one window's worth, the burst a
sliding one-second count lets through) of 200s over the run, and not much less (a client over the
rate still gets the rate), every other answer a 429 problem with Retry-After and the RateLimit
fields; the slow client gets nothing but 200s; the replicas' own limits are out of reach, so
every 429 is the edge's.
"""

import http.client
import json
import os
import signal
import threading
import time

RATE = 100  # requests a second per client address, at the edge
SECONDS = 6.0
THREADS = 4  # per client: each its own keep-alive connection, paced open loop


def paced(port, source, rate, tok, until, out, lock):
    """GET /todos?limit=1 from `source` at `rate` a second until `until`; appends (t, status,
    headers, body) to `out`."""
    interval = 1.0 / rate
    conn = None
    next_at = time.monotonic()
    while next_at < until:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        next_at += interval
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
            conn.request("GET", "/todos?limit=1", headers={"Authorization": f"Bearer {tok}"})
            r = conn.getresponse()
            body = r.read()
            record = (time.monotonic(), r.status, {k.lower(): v for k, v in r.getheaders()}, body)
        except (OSError, http.client.HTTPException) as e:
            conn = None
            record = (time.monotonic(), type(e).__name__, {}, b"")
        with lock:
            out.append(record)


def send(port, source, rate, tok, seconds):
    out, lock = [], threading.Lock()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=paced, args=(port, source, rate / THREADS, tok, until, out, lock))
               for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out, key=lambda r: r[0])


def busiest_second(records):
    """The most 200s in any one-second window."""
    ok = [t for t, status, _, _ in records if status == 200]
    best, j = 0, 0
    for i, t in enumerate(ok):
        while ok[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def is_edge_refusal(headers, body):
    try:
        problem = json.loads(body)
    except ValueError:
        return False
    return (headers.get("retry-after") == "1" and problem.get("code") == "rate_limited"
            and headers.get("content-type") == "application/problem+json"
            and headers.get("ratelimit-policy") == f'"edge";q={RATE};w=1'
            and headers.get("ratelimit") == '"edge";r=0;t=1')


def drill(c, state, tok, checks):
    c.log(f"\n== edge rate limit: a second HAProxy at {RATE}/s per client address; 127.0.0.2 sends "
          f"{3 * RATE}/s and 127.0.0.3 {RATE // 4}/s for {SECONDS:.0f} s")
    h = {"port": c.free_port(), "dir": f"{state['base']}/haproxy-edge"}
    h["cfg"] = f"{h['dir']}/haproxy.cfg"
    c.haproxy_start(state, h, edge_rate=RATE)
    try:
        for r in state["replicas"]:
            c.wait_for(f"edge HAProxy sees {r['name']} UP", lambda: edge_sees_up(c, h, r["name"]), 15)
        results = {}
        runs = [threading.Thread(target=lambda k=k, src=src, rate=rate: results.__setitem__(
                    k, send(h["port"], src, rate, tok, SECONDS)))
                for k, src, rate in (("fast", "127.0.0.2", 3 * RATE), ("slow", "127.0.0.3", RATE // 4))]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
    finally:
        if c.pid_alive(h.get("pid")):
            os.kill(h["pid"], signal.SIGTERM)
    out = {"rate_per_second": RATE, "seconds": SECONDS}
    for k, records in results.items():
        statuses = {}
        for _, status, _, _ in records:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        span = (records[-1][0] - records[0][0]) if len(records) > 1 else 0.0
        out[k] = {"sent": len(records), "sent_per_second": round(len(records) / max(span, 1e-9), 1),
                  "statuses": statuses, "busiest_second_2xx": busiest_second(records)}
        c.log(f"  {k}: {out[k]}")
    fast, slow = results["fast"], results["slow"]
    ok = out["fast"]["statuses"].get("200", 0)
    allowed = RATE * SECONDS + RATE
    checks.expect(out["fast"]["sent_per_second"] >= 2 * RATE,
                  f"edge: the fast client sent at least twice the rate ({out['fast']['sent_per_second']}/s)")
    checks.expect(ok <= allowed, f"edge: the fast client got at most its rate plus one burst of 200s ({ok} <= {allowed})")
    checks.expect(ok >= 0.8 * RATE * SECONDS, f"edge: and not much less: it still gets its rate ({ok} >= {0.8 * RATE * SECONDS:.0f})")
    refusals = [(hd, b) for _, s, hd, b in fast if s == 429]
    checks.expect(ok + len(refusals) == len(fast),
                  f"edge: every other answer to the fast client a 429 ({len(refusals)} of {len(fast) - ok})")
    checks.expect(all(is_edge_refusal(hd, b) for hd, b in refusals),
                  "edge: each 429 a rate_limited problem with Retry-After 1 and the edge's RateLimit fields")
    checks.expect(all(s == 200 for _, s, _, _ in slow) and slow,
                  f"edge: the slow client unaffected: all {len(slow)} answers 200")
    return out


def edge_sees_up(c, h, name):
    state = {"haproxy": h}
    return c.haproxy_servers(state).get(name, ("",))[0].startswith("UP")
