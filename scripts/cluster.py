#!/usr/bin/env python3
"""The local cluster behind scripts/cluster.sh: a PostgreSQL primary with a synchronous streaming
standby, PgBouncer in transaction mode (a release that carries prepared statements), three
service replicas and HAProxy in front, all on 127.0.0.1, and the drills that break it under load.

Why a script of its own and not part of loadtest/run.py: the cluster outlives one command (`up`
leaves it running for curl and oha, `down` stops it), so its processes are daemons whose state
lives in target/cluster/state.json, and the drills assert bounds (exit 1 when one is broken)
where the load test only prints figures. Standard library only.

Every process it starts is recorded in the state file before it is waited on, so `down` (and the
exit handler of `drill`) stops whatever came up, also after a failure half-way.
"""

import argparse
import datetime
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_DIR = os.path.join(ROOT, "target", "cluster")
STATE_FILE = os.path.join(STATE_DIR, "state.json")
BINARY = os.path.join(ROOT, "target", "release", "todo-service")
# The previous release, for the upgrade drill (scripts/build-previous-release.sh; cluster.sh sets it).
PREVIOUS = os.environ.get("PREVIOUS_RELEASE")
RESULTS_DIR = os.path.join(ROOT, "loadtest", "results")
REPLICAS = 3
# HAProxy checks /ready every 500 ms and takes a replica out after 2 failures (deploy/compose/
# haproxy.cfg): a replica that is shutting down says not-ready for longer than that before it
# closes its listener.
READINESS_DELAY = "2s"
# A request that has had no answer after this long counts as hung (REQUEST_TIMEOUT is 10 s).
CLIENT_TIMEOUT = 15.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    """A port free now, below the kernel's ephemeral range. A port that `bind(0)` hands out comes
    from that range, where any outgoing connection (a replica's to PgBouncer, PgBouncer's to the
    server) may take it before the process meant to listen on it starts: a CI run lost a replica's
    admin port that way."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 10000 if ephemeral_low > 11000 else 1024
    for _ in range(200):
        port = random.randint(low, ephemeral_low - 1)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port below the ephemeral range")


def as_owner(cmd):
    """PostgreSQL and PgBouncer refuse to run as root: as root they run as the postgres user."""
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


def pg_bin(name):
    return os.path.join(os.environ["PG_BIN"], name)


def sh(cmd, timeout=120, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def psql(port, sql, db="todos", timeout=30):
    return sh([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db,
               "-qtAX", "-c", sql], timeout=timeout).strip()


def wait_for(what, predicate, limit=30.0, every=0.05):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise RuntimeError(f"{what}: not within {limit} s")


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


# --- state ----------------------------------------------------------------------------------

def load_state():
    try:
        with open(STATE_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save_state(state):
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.chmod(tmp, 0o600)  # it holds the JWT secret
    os.replace(tmp, STATE_FILE)


# --- PostgreSQL -----------------------------------------------------------------------------

def pg_start(state, node):
    n = state[node]
    opts = (f"-c listen_addresses=127.0.0.1 -p {n['port']} -k {n['dir']} -c max_connections=100 "
            "-c wal_level=replica -c max_wal_senders=4 -c hot_standby=on -c fsync=off")
    sh(as_owner([pg_bin("pg_ctl"), "-D", n["data"], "-l", n["log"], "-o", opts, "-w", "-t", "60", "start"]))
    n["pid"] = postmaster_pid(n)


def postmaster_pid(n):
    try:
        with open(os.path.join(n["data"], "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def pg_stop(n, mode="fast"):
    if os.path.exists(os.path.join(n["data"], "postmaster.pid")):
        sh(as_owner([pg_bin("pg_ctl"), "-D", n["data"], "-m", mode, "-w", "stop"]), check=False)


# --- PgBouncer ------------------------------------------------------------------------------

def pgbouncer_write_config(state):
    b = state["pgbouncer"]
    writer = state[state["writer"]]
    with open(os.path.join(b["dir"], "pgbouncer.ini"), "w") as f:
        f.write(f"""[databases]
todos = host=127.0.0.1 port={writer['port']} dbname=todos

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {b['port']}
unix_socket_dir =
auth_type = trust
auth_file = {b['dir']}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {b['pool_size']}
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits,options
; Named statements carried per server connection: the replicas run DB_POOLER_MODE=transaction-prepared.
max_prepared_statements = 200
; After a failed login to the server, try again in 1 s rather than 15: a failover's recovery
; time is bounded by this.
server_login_retry = 1
server_connect_timeout = 2
logfile = {b['dir']}/pgbouncer.log
pidfile = {b['dir']}/pgbouncer.pid
""")


def pgbouncer_start(state):
    b = state["pgbouncer"]
    pgbouncer_write_config(state)
    # A copy beside its configuration: run as the postgres user, it may not reach into the checkout.
    binary = os.path.join(b["dir"], "pgbouncer")
    if not os.path.exists(binary):
        shutil.copy(os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", binary)
    sh(as_owner([binary, "-d", os.path.join(b["dir"], "pgbouncer.ini")]))
    wait_for("PgBouncer listening", lambda: listening(b["port"]), 10)
    with open(os.path.join(b["dir"], "pgbouncer.pid")) as f:
        b["pid"] = int(f.read().strip())


def pgbouncer_admin(state, command):
    return sh([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(state["pgbouncer"]["port"]), "-U", "postgres",
               "-d", "pgbouncer", "-qtAX", "-c", command], timeout=60)


# --- the service replicas -------------------------------------------------------------------

def replica_env(state, r):
    writer = state[state["writer"]]
    return dict(os.environ, **{
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{state['pgbouncer']['port']}/todos?sslmode=disable",
        "DB_POOLER_MODE": "transaction-prepared",
        # Migrations need a session (an advisory lock): straight to the primary.
        "DATABASE_MIGRATION_URL": f"postgres://postgres@127.0.0.1:{writer['port']}/todos?sslmode=disable",
        "DB_POOL_MAX_SIZE": "16",
        "LISTEN_ADDR": f"127.0.0.1:{r['port']}",
        "ADMIN_LISTEN_ADDR": f"127.0.0.1:{r['admin_port']}",
        "SHUTDOWN_READINESS_DELAY": READINESS_DELAY,
        "SHUTDOWN_TIMEOUT": "10s",
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "AUTH_MODE": "jwt",
        "AUTH_JWT_SECRET": state["jwt_secret"],
        # Every drill client is one principal from one IP: the per-caller limits are set out of
        # reach so that what is measured is the cluster, not the limiter.
        "RATE_LIMIT_PER_SECOND": "1000000",
        "RATE_LIMIT_BURST": "1000000",
        "DB_APPLICATION_NAME": f"todo-service-{r['name']}",
        "OTEL_SDK_DISABLED": "true",
        "LOG_LEVEL": "warn",
        "LOG_FORMAT": "json",
    })


def replica_start(state, r, wait=True):
    logf = open(r["log"], "a")
    proc = subprocess.Popen([r.get("binary") or BINARY], env=replica_env(state, r), stdout=logf, stderr=logf,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    logf.close()
    r["pid"] = proc.pid
    save_state(state)
    if wait:
        wait_for(f"replica {r['name']} ready", lambda: get_status(r["port"], "/ready") == 200, 30)


def replica_stop(r, sig=signal.SIGTERM, wait=20.0):
    pid = r.get("pid")
    if not pid_alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while pid_alive(pid) and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.02)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    reap(pid)


def reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def get_status(port, path):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status
    except OSError:
        return 0


# --- HAProxy --------------------------------------------------------------------------------

# The balancing policy is the one docker-compose.yml's `scale` profile ships (health checks on
# /ready, which requests are sent again, the problems HAProxy answers itself), so the drills test
# that file; only where the replicas are and what HAProxy listens on differ here.
COMPOSE_HAPROXY = os.path.join(ROOT, "deploy", "compose", "haproxy.cfg")


def haproxy_sections(text):
    """[(header, [lines])] of an HAProxy configuration, comments and blank lines dropped."""
    sections = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            sections.append((line, []))
        else:
            sections[-1][1].append(line)
    return sections


# The cluster's own HAProxy carries the drills' load from one address, so its edge rate limit is
# set out of reach; the edge-limit drill (cluster_edge.py) starts a second one with a low rate.
NO_EDGE_LIMIT = 1_000_000_000


def haproxy_write_config(state, h):
    with open(COMPOSE_HAPROXY) as f:
        shipped = haproxy_sections(f.read())
    out = [f"global\n    maxconn 4000\n    pidfile {h['dir']}/haproxy.pid\n"
           f"    stats socket {h['dir']}/haproxy.sock mode 600 level admin\n    daemon\n"]
    for header, lines in shipped:
        kind = header.split()[0]
        if kind in ("global", "resolvers"):
            continue  # ours above; the replicas' addresses are known here, no DNS
        body = []
        for line in lines:
            words = line.split()
            if kind == "frontend" and words[0] == "bind":
                line = f"    bind 127.0.0.1:{h['port']}"
            elif words[0] == "server-template":
                continue
            elif words[0] == "default-server":
                line = line.replace(" resolvers docker init-addr none", "")
            body.append(line)
        if kind == "backend":
            body += [f"    server {r['name']} 127.0.0.1:{r['port']} check" for r in state["replicas"]]
        out.append("\n".join([header] + body) + "\n")
    with open(h["cfg"], "w") as f:
        f.write("\n".join(out))
    subprocess.run(["haproxy", "-c", "-q", "-f", h["cfg"]], check=True, timeout=30,
                   env=dict(os.environ, EDGE_RATE_LIMIT_PER_SECOND="1"))


def haproxy_start(state, h=None, edge_rate=NO_EDGE_LIMIT):
    """The shipped configuration in front of the replicas, listening at `h` (the cluster's own
    HAProxy by default), each client address held to `edge_rate` requests a second."""
    h = h or state["haproxy"]
    os.makedirs(h["dir"], exist_ok=True)
    haproxy_write_config(state, h)
    subprocess.run(["haproxy", "-f", h["cfg"]], check=True, timeout=30,
                   env=dict(os.environ, EDGE_RATE_LIMIT_PER_SECOND=str(edge_rate)))
    wait_for("HAProxy listening", lambda: listening(h["port"]), 10)
    with open(os.path.join(h["dir"], "haproxy.pid")) as f:
        h["pid"] = int(f.read().strip())


def haproxy_cmd(state, command):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(os.path.join(state["haproxy"]["dir"], "haproxy.sock"))
    s.sendall(command.encode() + b"\n")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.decode()


def haproxy_servers(state):
    """{name: (status, current sessions)} from HAProxy's stats."""
    lines = haproxy_cmd(state, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "replicas" and row.get("svname") not in ("FRONTEND", "BACKEND"):
            out[row["svname"]] = (row["status"], int(row["scur"] or 0))
    return out


def wait_haproxy(state, name, status, limit=15.0):
    wait_for(f"HAProxy sees {name} {status}", lambda: haproxy_servers(state).get(name, ("",))[0].startswith(status), limit)


# --- up / down ------------------------------------------------------------------------------

def up(args):
    if load_state():
        raise SystemExit("a cluster is already up (scripts/cluster.sh status); `scripts/cluster.sh down` first")
    base = tempfile.mkdtemp(prefix="todo-service-cluster-")
    os.chmod(base, 0o755)
    state = {
        "base": base, "writer": "primary",
        "jwt_secret": secrets.token_urlsafe(48),
        "primary": {"port": free_port(), "dir": f"{base}/primary", "data": f"{base}/primary/data",
                    "log": f"{base}/primary/server.log"},
        "standby": {"port": free_port(), "dir": f"{base}/standby", "data": f"{base}/standby/data",
                    "log": f"{base}/standby/server.log"},
        "pgbouncer": {"port": free_port(), "dir": f"{base}/pgbouncer", "pool_size": 20},
        "haproxy": {"port": args.port or free_port(), "dir": f"{base}/haproxy", "cfg": f"{base}/haproxy/haproxy.cfg"},
        "replicas": [{"name": f"r{i}", "port": free_port(), "admin_port": free_port(),
                      "log": os.path.join(STATE_DIR, f"r{i}.log"), "binary": getattr(args, "binary", None)}
                     for i in range(1, args.replicas + 1)],
    }
    save_state(state)
    try:
        return start(state)
    except BaseException:
        down()  # whatever came up before the failure
        raise


def start(state):
    """Brings up what `state` describes, saving each process in it as it starts."""
    base = state["base"]
    for r in state["replicas"]:
        if os.path.exists(r["log"]):
            os.remove(r["log"])  # a previous cluster's
    for d in ("primary", "standby", "pgbouncer", "haproxy"):
        os.makedirs(state[d]["dir"])
    if os.geteuid() == 0:
        sh(["chown", "-R", "postgres:", f"{base}/primary", f"{base}/standby", f"{base}/pgbouncer"])
    with open(f"{base}/pgbouncer/userlist.txt", "w") as f:
        f.write('"postgres" ""\n')

    t0 = time.monotonic()
    p, s = state["primary"], state["standby"]
    sh(as_owner([pg_bin("initdb"), "--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C",
                 "-D", p["data"]]))
    pg_start(state, "primary")
    save_state(state)
    psql(p["port"], "CREATE DATABASE todos", db="postgres")
    # Through the pooler the replicas' timeouts come from the database's settings (the service
    # checks them before serving); the standby has them too, by replication.
    for setting in ("statement_timeout", "idle_in_transaction_session_timeout"):
        psql(p["port"], f"ALTER DATABASE todos SET {setting} = '5s'", db="postgres")
    # The standby: a base backup streamed from the primary, following it under the name the
    # primary's synchronous_standby_names waits for.
    sh(as_owner([pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p["port"]), "-U", "postgres",
                 "-D", s["data"], "-X", "stream", "--checkpoint=fast", "-R", "-d",
                 f"host=127.0.0.1 port={p['port']} user=postgres application_name=standby"]), timeout=300)
    pg_start(state, "standby")
    save_state(state)
    wait_for("the standby streaming",
             lambda: psql(p["port"], "SELECT state FROM pg_stat_replication WHERE application_name = 'standby'",
                          db="postgres") == "streaming", 30)
    # Synchronous replication from here on: a commit is acknowledged once the standby has it, so
    # a failover loses no acknowledged write. Set after the base backup, so the standby's copy of
    # the configuration does not have it: promoted, it must not wait for a standby of its own.
    psql(p["port"], "ALTER SYSTEM SET synchronous_standby_names = 'standby'", db="postgres")
    psql(p["port"], "SELECT pg_reload_conf()", db="postgres")
    wait_for("the standby streaming synchronously",
             lambda: psql(p["port"], "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'",
                          db="postgres") == "sync", 30)
    log(f"PostgreSQL: primary 127.0.0.1:{p['port']}, synchronous standby 127.0.0.1:{s['port']}")
    pgbouncer_start(state)
    save_state(state)
    log(f"PgBouncer (transaction mode, {state['pgbouncer']['pool_size']} server connections): "
        f"127.0.0.1:{state['pgbouncer']['port']}")
    for r in state["replicas"]:
        replica_start(state, r, wait=False)
    for r in state["replicas"]:
        wait_for(f"replica {r['name']} ready", lambda r=r: get_status(r["port"], "/ready") == 200, 60)
    log("replicas: " + ", ".join(f"{r['name']} 127.0.0.1:{r['port']}" for r in state["replicas"]))
    haproxy_start(state)
    save_state(state)
    for r in state["replicas"]:
        wait_haproxy(state, r["name"], "UP")
    log(f"HAProxy: http://127.0.0.1:{state['haproxy']['port']} (up in {time.monotonic() - t0:.1f} s)")
    return state


def down(_args=None):
    state = load_state()
    if not state:
        log("no cluster is up")
        return
    h = state["haproxy"]
    if pid_alive(h.get("pid")):
        os.kill(h["pid"], signal.SIGTERM)
    for r in state["replicas"]:
        replica_stop(r, signal.SIGKILL if not pid_alive(r.get("pid")) else signal.SIGTERM, wait=5)
    b = state["pgbouncer"]
    if pid_alive(b.get("pid")):
        os.kill(b["pid"], signal.SIGQUIT)  # immediate; SIGTERM would wait for every client
    for node in ("primary", "standby"):
        if os.path.isdir(state[node]["data"]):
            pg_stop(state[node], "immediate")
    shutil.rmtree(state["base"], ignore_errors=True)
    os.remove(STATE_FILE)
    log("cluster stopped and removed")


def token(state):
    out = subprocess.run([BINARY, "token", "--sub", "cluster-drill", "--ttl", "12h"],
                         env=dict(os.environ, AUTH_JWT_SECRET=state["jwt_secret"]),
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def status(_args=None):
    state = load_state()
    if not state:
        log("no cluster is up (scripts/cluster.sh up)")
        return 1
    print(f"API (HAProxy): http://127.0.0.1:{state['haproxy']['port']}")
    print(f"token:         TOKEN=$(AUTH_JWT_SECRET=$(python3 -c 'import json; print(json.load(open(\"{STATE_FILE}\"))[\"jwt_secret\"])') "
          f"target/release/todo-service token --sub alice)")
    try:
        seen = haproxy_servers(state)
    except OSError:
        seen = {}
    for r in state["replicas"]:
        st, cur = seen.get(r["name"], ("unknown (HAProxy not answering)", 0))
        print(f"replica {r['name']}:    127.0.0.1:{r['port']} (admin {r['admin_port']}), HAProxy says {st}, {cur} in flight, log {r['log']}")
    print(f"PgBouncer:     127.0.0.1:{state['pgbouncer']['port']} -> {state['writer']}")
    for node in ("primary", "standby"):
        n = state[node]
        role = ("writer" if node == state["writer"] else
                "former writer, failed over" if state.get("failed_over") else "synchronous standby")
        print(f"{node}:{' ' * (14 - len(node))}127.0.0.1:{n['port']} ({role}, "
              f"{'running' if pid_alive(postmaster_pid(n)) else 'stopped'})")
    return 0


# --- load -----------------------------------------------------------------------------------

class Load:
    """Closed-loop clients through HAProxy, each on a kept-alive connection: reads of known todos,
    lists, and creates with an Idempotency-Key (as a careful client sends them). Every answer is
    recorded with its time, so each phase of a drill can be judged on its own."""

    def __init__(self, state, tok, clients=12, write_share=0.25):
        self.port = state["haproxy"]["port"]
        self.auth = f"Bearer {tok}"
        self.clients = clients
        self.write_share = write_share
        self.records = []  # (t_start, t_end, method, status, retry_after, error, created_id)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.known = []
        self.threads = []
        # Every create's title is unique, so a create applied twice shows as a repeated title.
        self.tag = uuid.uuid4().hex[:8]

    def seed(self, n=50):
        for i in range(n):
            st, _, body, _ = self.request(None, "POST", "/todos", {"title": f"seed {self.tag} {i}"})
            if st == 201:
                self.known.append(json.loads(body)["id"])
        if not self.known:
            raise RuntimeError("could not create any todo through the cluster")

    def request(self, conn, method, path, body=None):
        headers = {"Authorization": self.auth}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            if method == "POST":
                headers["Idempotency-Key"] = str(uuid.uuid4())
        own = conn is None
        if own:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
            if r.getheader("connection", "").lower() == "close":
                conn.close()
            return r.status, r.getheader("retry-after"), payload, None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            return 0, None, b"", type(e).__name__
        finally:
            if own:
                conn.close()

    def worker(self, n):
        rng = random.Random(n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            roll = rng.random()
            if roll < self.write_share:
                method, path, body = "POST", "/todos", {"title": f"drill {self.tag} {n}-{i}"}
            elif roll < self.write_share + 0.1:
                method, path, body = "GET", "/todos?limit=10", None
            else:
                method, path, body = "GET", f"/todos/{rng.choice(self.known)}", None
            t0 = time.monotonic()
            st, ra, payload, err = self.request(conn, method, path, body)
            t1 = time.monotonic()
            created = None
            if st == 201:
                try:
                    created = json.loads(payload)["id"]
                except (ValueError, KeyError):
                    pass
            elif st >= 400 and not err:
                # The problem's code says who answered: the service (circuit_open,
                # database_unavailable, ...) or HAProxy (no_replica, bad_gateway).
                try:
                    err = json.loads(payload)["code"]
                except (ValueError, KeyError, TypeError):
                    err = "not a problem+json body"
            with self.lock:
                self.records.append((t0, t1, method, st, ra, err, created))
            if st in (0, 502, 503, 504):
                # What a client does with Retry-After, shortened for the drill.
                time.sleep(0.05)

    def start(self):
        self.threads = [threading.Thread(target=self.worker, args=(n,), daemon=True) for n in range(self.clients)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT + 5)

    def between(self, t0, t1):
        with self.lock:
            return [r for r in self.records if t0 <= r[0] < t1]


def tally(records):
    """Counts by "METHOD status" and the answers that break the contract: no answer at all, or a
    5xx without Retry-After."""
    by = {}
    for _, _, m, st, ra, err, _ in records:
        key = f"{m} {st} {err}" if st and err else f"{m} {st if st else err}"
        by[key] = by.get(key, 0) + 1
    bad = [r for r in records if r[3] == 0 or (r[3] >= 500 and not r[4])]
    lat = sorted(r[1] - r[0] for r in records) or [0.0]
    return {"requests": len(records), "statuses": dict(sorted(by.items())),
            "no_answer_or_5xx_without_retry_after": len(bad),
            "failed": sum(1 for r in records if not 200 <= r[3] < 300),
            "failed_gets": sum(1 for r in records if r[2] == "GET" and not 200 <= r[3] < 300),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1), "max_ms": round(lat[-1] * 1000, 1)}


def recovered_at(load, since, window=1.0, limit=60.0):
    """The first moment after `since` from which every answer was a success for `window` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.2)
        recs = sorted(load.between(since, time.monotonic()), key=lambda r: r[0])
        last_bad = max((r[1] for r in recs if not 200 <= r[3] < 300), default=since)
        ok_after = [r for r in recs if r[0] > last_bad]
        if ok_after and time.monotonic() - last_bad >= window and len(ok_after) >= 10:
            return last_bad
    raise RuntimeError(f"no recovery within {limit} s")


# --- drills ---------------------------------------------------------------------------------

class Checks:
    def __init__(self):
        self.failed = []

    def expect(self, ok, what):
        log(f"    {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failed.append(what)


def drill_rolling_restart(state, load, checks):
    log("\n== rolling restart of every replica (SIGTERM: not-ready for "
        f"{READINESS_DELAY}, then drain; started again; the next once HAProxy sees it up)")
    t0 = time.monotonic()
    for r in state["replicas"]:
        t = time.monotonic()
        replica_stop(r, signal.SIGTERM)
        stopped = time.monotonic() - t
        replica_start(state, r)
        wait_haproxy(state, r["name"], "UP")
        log(f"    {r['name']}: stopped in {stopped:.2f} s, back in HAProxy {time.monotonic() - t:.2f} s after SIGTERM")
    time.sleep(0.5)
    t = tally(load.between(t0, time.monotonic()))
    log(f"    {t}")
    checks.expect(t["failed"] == 0, f"rolling restart: 0 failed requests ({t['failed']} of {t['requests']})")
    return {"seconds": round(time.monotonic() - t0, 2), **t}


def drill_kill_replica(state, load, checks):
    r = state["replicas"][1]
    log(f"\n== kill -9 of replica {r['name']} under load")
    time.sleep(1.0)
    in_flight = haproxy_servers(state)[r["name"]][1]
    t0 = time.monotonic()
    os.kill(r["pid"], signal.SIGKILL)
    reap(r["pid"])
    wait_haproxy(state, r["name"], "DOWN")
    detected = time.monotonic() - t0
    time.sleep(1.0)
    t = tally(load.between(t0 - 0.5, time.monotonic()))
    log(f"    HAProxy took it out {detected:.2f} s after the kill; {in_flight} requests were in flight on it just before")
    log(f"    {t}")
    checks.expect(t["failed_gets"] == 0, f"kill -9: 0 failed GETs ({t['failed_gets']})")
    twice = applied_twice(state)
    checks.expect(twice == 0, f"kill -9: no create sent again by HAProxy was applied twice ({twice})")
    checks.expect(t["failed"] <= load.clients,
                  f"kill -9: failures ({t['failed']}) bounded by the requests in flight (at most {load.clients} clients)")
    replica_start(state, r)
    wait_haproxy(state, r["name"], "UP")
    return {"detected_s": round(detected, 2), "in_flight_before": in_flight, **t}


def drill_pgbouncer_restart(state, load, checks):
    b = state["pgbouncer"]
    log("\n== PgBouncer restart (SIGQUIT: immediate shutdown, 1 s down, started again; no replica restarted)")
    time.sleep(1.0)
    t0 = time.monotonic()
    # Immediate, in-flight queries cut: SIGQUIT from PgBouncer 1.23 on (SIGTERM now waits for
    # every client to leave, which pooled replicas never do).
    os.kill(b["pid"], signal.SIGQUIT)
    wait_for("PgBouncer gone", lambda: not pid_alive(b["pid"]), 10)
    time.sleep(1.0)
    pgbouncer_start(state)
    save_state(state)
    back = time.monotonic() - t0
    rec = recovered_at(load, t0)
    t = tally(load.between(t0, rec + 0.5))
    log(f"    PgBouncer down {back:.2f} s; every answer a success again {rec - t0:.2f} s after the stop")
    log(f"    {t}")
    checks.expect(t["no_answer_or_5xx_without_retry_after"] == 0,
                  f"PgBouncer restart: every answer is a success or a 5xx with Retry-After "
                  f"({t['no_answer_or_5xx_without_retry_after']} not)")
    checks.expect(t["max_ms"] < 11_000, f"PgBouncer restart: none hang (slowest {t['max_ms']} ms, bound 11 s)")
    return {"down_s": round(back, 2), "recovered_s": round(rec - t0, 2), **t}


def drill_pgbouncer_pause(state, load, checks, hold):
    log(f"\n== PgBouncer PAUSE for {hold:.0f} s, then RESUME")
    time.sleep(1.0)
    t0 = time.monotonic()
    pgbouncer_admin(state, "PAUSE todos")
    paused = time.monotonic()
    time.sleep(hold)
    pgbouncer_admin(state, "RESUME todos")
    resumed = time.monotonic()
    time.sleep(2.0)
    during = tally(load.between(t0, resumed))
    rec = recovered_at(load, t0)
    after = tally(load.between(resumed + 2.0, time.monotonic()))
    log(f"    PAUSE took {paused - t0:.2f} s to settle; resumed after {resumed - t0:.2f} s; "
        f"every answer a success again {rec - t0:.2f} s after the PAUSE")
    log(f"    during: {during}")
    log(f"    after:  {after}")
    checks.expect(during["no_answer_or_5xx_without_retry_after"] == 0,
                  "PAUSE: requests wait or get a 5xx with Retry-After "
                  f"({during['no_answer_or_5xx_without_retry_after']} not)")
    checks.expect(during["max_ms"] < 11_000, f"PAUSE: none hang (slowest {during['max_ms']} ms, bound 11 s)")
    checks.expect(after["failed"] == 0 and after["requests"] > 0,
                  f"after RESUME: all succeed without restarting a replica ({after['failed']} of {after['requests']} failed)")
    return {"held_s": hold, "recovered_s": round(rec - t0, 2), "during": during, "after": after}


def drill_doctor(state, checks):
    """`todo-service doctor` with a replica's settings passes (the pooler, the migration route,
    a writable primary), and pointed at the standby it fails, naming why: what an operator runs
    when writes fail after a failover."""
    log("\n== doctor: with a replica's settings, and with DATABASE_URL at the standby")

    def doctor(env):
        out = subprocess.run([BINARY, "doctor"], env=env, capture_output=True, text=True, timeout=60)
        return out.returncode, out.stdout

    def line(report, name):
        return next((l.strip() for l in report.splitlines() if f"] {name}:" in l), f"(no {name} line)")

    env = replica_env(state, state["replicas"][0])
    code, report = doctor(env)
    for name in ("writable", "connection budget", "pooler sessions", "migration route"):
        log(f"    {line(report, name)[:160]}")
    checks.expect(code == 0 and line(report, "migration route").startswith("[pass]")
                  and line(report, "writable").startswith("[pass]")
                  and line(report, "pooler sessions").startswith("[pass]"),
                  f"doctor passes with a replica's settings (exit {code})")
    standby = state["standby" if state["writer"] == "primary" else "primary"]
    env = dict(env, DATABASE_URL=f"postgres://postgres@127.0.0.1:{standby['port']}/todos?sslmode=disable",
               DB_POOLER_MODE="none")
    env.pop("DATABASE_MIGRATION_URL")
    code, report = doctor(env)
    log(f"    {line(report, 'writable')[:160]}")
    checks.expect(code == 1 and line(report, "writable").startswith("[FAIL]"),
                  f"doctor fails at 'writable' against the standby (exit {code})")
    return {"replica_settings_exit": code == 0, "standby_line": line(report, "writable")}


def drill_failover(state, load, checks, detect):
    old, new = state["writer"], ("standby" if state["writer"] == "primary" else "primary")
    o, n = state[old], state[new]
    log(f"\n== failover: kill -9 of every process of the primary; {detect:.0f} s later the standby is promoted "
        "and PgBouncer repointed (RELOAD)")
    time.sleep(1.0)
    t0 = time.monotonic()
    # The whole server at once, as when its machine dies: the postmaster and every backend and
    # WAL sender (pg_ctl starts it as a process group leader). A commit acknowledged here but not
    # yet on the standby would be lost; synchronous replication is what prevents it.
    os.killpg(postmaster_pid(o), signal.SIGKILL)
    time.sleep(detect)  # a failover manager's detection time
    sh(as_owner([pg_bin("pg_ctl"), "-D", n["data"], "-w", "promote"]))
    promoted = time.monotonic() - t0
    state["writer"] = new
    state["failed_over"] = True
    save_state(state)
    pgbouncer_write_config(state)
    pgbouncer_admin(state, "RELOAD")
    repointed = time.monotonic() - t0
    rec = recovered_at(load, t0)
    window = load.between(t0, rec + 0.5)
    t = tally(window)
    writes_refused = sum(1 for r in window if r[2] == "POST" and r[3] == 503 and r[4])
    log(f"    promoted {promoted:.2f} s, repointed {repointed:.2f} s, every answer a success again "
        f"{rec - t0:.2f} s after the kill")
    log(f"    {t}")
    checks.expect(t["no_answer_or_5xx_without_retry_after"] == 0,
                  "failover: every answer is a success or a 5xx with Retry-After "
                  f"({t['no_answer_or_5xx_without_retry_after']} not)")
    checks.expect(writes_refused > 0, f"failover: writes got 503 with Retry-After while no primary answered ({writes_refused})")
    # Every write the cluster acknowledged, before and during the failover, is on the new primary.
    time.sleep(1.0)
    with load.lock:
        acked = sorted({r[6] for r in load.records if r[6] is not None} | set(load.known))
    found = int(psql(n["port"], f"SELECT count(*) FROM todos WHERE id = ANY('{{{','.join(map(str, acked))}}}'::bigint[])"))
    lost = len(acked) - found
    log(f"    acknowledged writes: {len(acked)}; on the new primary: {found}")
    checks.expect(lost == 0, f"failover: every acknowledged write is on the new primary ({lost} lost of {len(acked)})")
    twice = applied_twice(state)
    checks.expect(twice == 0, f"failover: no create was applied twice ({twice})")
    return {"detect_s": detect, "promoted_s": round(promoted, 2), "repointed_s": round(repointed, 2),
            "recovered_s": round(rec - t0, 2), "writes_refused_503": writes_refused,
            "acknowledged_writes": len(acked), "lost": lost, **t}


def applied_twice(state):
    """Creates applied more than once: todos sharing a title (every drill create's is unique)."""
    return int(psql(state[state["writer"]]["port"], "SELECT count(*) - count(DISTINCT title) FROM todos"))


def cpu_by_process():
    """CPU ticks used so far by each of the cluster's kinds of process, read from /proc. A
    process's own time plus that of its children that have exited (cutime, cstime), so a backend
    PostgreSQL ends during a run still counts, in its postmaster's row."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        kind = ("todo-service" if comm.startswith("todo-service") else
                "postgres" if comm == "postgres" else comm if comm in ("haproxy", "pgbouncer") else None)
        if kind:
            out[kind] = out.get(kind, 0) + sum(int(x) for x in fields[11:15])
    return out


def oha(url, tok, seconds, conc=64):
    # --disable-compression: oha asks for gzip and br by default; the throughput figures are
    # compared with runs from before the service compressed.
    cmd = ["oha", "--no-tui", "--output-format", "json", "--disable-compression", "-z", f"{seconds}s",
           "-c", str(conc), "-H", f"authorization: Bearer {tok}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr[-500:]}")
    j = json.loads(out.stdout)
    statuses = j.get("statusCodeDistribution", {})
    return j["summary"]["requestsPerSec"], statuses


def drill_throughput(state, tok, todo_id, seconds):
    log(f"\n== throughput: GET one todo, oha -c 64 for {seconds} s, through HAProxy with 1, 2 and 3 "
        "replicas in service, straight to one replica (no balancer), and to a replica straight to "
        "PostgreSQL (no balancer, no pooler)")
    # A fourth replica for the last: DB_POOLER_MODE=none, named statements, one exchange per call.
    unpooled = {"name": "unpooled", "port": free_port(), "admin_port": free_port()}
    env = dict(replica_env(state, unpooled), DB_POOLER_MODE="none",
               DATABASE_URL=f"postgres://postgres@127.0.0.1:{state[state['writer']]['port']}/todos?sslmode=disable")
    del env["DATABASE_MIGRATION_URL"]
    with open(os.path.join(STATE_DIR, "unpooled.log"), "w") as logf:
        proc = subprocess.Popen([BINARY], env=env, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT)
    try:
        wait_for("the unpooled replica ready", lambda: get_status(unpooled["port"], "/ready") == 200, 30)
        return throughput_runs(state, tok, todo_id, seconds, unpooled["port"])
    finally:
        proc.terminate()
        proc.wait(20)


def throughput_runs(state, tok, todo_id, seconds, unpooled_port):
    hz = os.sysconf("SC_CLK_TCK")
    results = {}
    path = f"/todos/{todo_id}"
    names = [r["name"] for r in state["replicas"]]
    runs = [("1 replica straight to PostgreSQL", f"http://127.0.0.1:{unpooled_port}{path}", names),
            ("1 replica through PgBouncer", f"http://127.0.0.1:{state['replicas'][0]['port']}{path}", names)]
    runs += [(f"HAProxy, {k} replica{'s' if k > 1 else ''}", f"http://127.0.0.1:{state['haproxy']['port']}{path}", names[:k])
             for k in range(1, len(names) + 1)]
    # Each configuration twice, in an order and its reverse, so a drift of the machine's speed
    # during the runs does not favour one of them.
    for label, url, enabled in runs + runs[::-1]:
        for name in names:
            haproxy_cmd(state, f"set server replicas/{name} state {'ready' if name in enabled else 'maint'}")
        for name in enabled:
            wait_haproxy(state, name, "UP")
        before = cpu_by_process()
        rps, statuses = oha(url, tok, seconds)
        after = cpu_by_process()
        total = rps * seconds
        us = {k: round((after.get(k, 0) - before.get(k, 0)) / hz * 1e6 / total, 1) for k in after if total}
        results.setdefault(label, []).append({"rps": round(rps), "statuses": statuses, "cpu_us_per_request": us,
                                              "cpu_us_total": round(sum(us.values()), 1)})
        log(f"    {label:33} {rps:8.0f} rps  statuses {statuses}  CPU µs/request {us} (total {sum(us.values()):.0f})")
    for name in names:
        haproxy_cmd(state, f"set server replicas/{name} state ready")
    summary = {}
    for label, rs in results.items():
        kinds = rs[0]["cpu_us_per_request"].keys()
        summary[label] = {"rps": round(sum(r["rps"] for r in rs) / len(rs)),
                          "cpu_us_per_request": {k: round(sum(r["cpu_us_per_request"].get(k, 0) for r in rs) / len(rs), 1)
                                                 for k in kinds},
                          "runs": rs}
        log(f"    mean {label:28} {summary[label]['rps']:8} rps  CPU µs/request {summary[label]['cpu_us_per_request']}")
    return summary


def drill(args):
    state = load_state()
    owned = state is None
    if owned:
        # On the previous release, when there is one, so the upgrade drill comes first.
        state = up(argparse.Namespace(replicas=REPLICAS, port=None, binary=PREVIOUS))
    checks = Checks()
    tok = token(state)
    result = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpus": os.cpu_count(), "drills": {}}
    load = None
    try:
        load = Load(state, tok, clients=args.clients)
        load.seed()
        load.start()
        time.sleep(1.0)
        base = tally(load.between(0, time.monotonic()))
        log(f"\n== baseline: {base}")
        checks.expect(base["failed"] == 0, f"baseline: no failures ({base['failed']})")
        result["drills"]["baseline"] = base
        if any(r.get("binary") for r in state["replicas"]):
            import cluster_upgrade
            result["drills"]["upgrade"] = cluster_upgrade.drill(sys.modules[__name__], state, tok, load, checks)
        result["drills"]["rolling_restart"] = drill_rolling_restart(state, load, checks)
        result["drills"]["kill_replica"] = drill_kill_replica(state, load, checks)
        result["drills"]["pgbouncer_restart"] = drill_pgbouncer_restart(state, load, checks)
        result["drills"]["pgbouncer_pause"] = drill_pgbouncer_pause(state, load, checks, args.pause)
        load.stop()
        result["drills"]["throughput"] = drill_throughput(state, tok, load.known[0], args.seconds)
        import cluster_edge
        result["drills"]["edge_limit"] = cluster_edge.drill(sys.modules[__name__], state, tok, checks)
        load = Load(state, tok, clients=args.clients)
        load.known = known_ids(state)
        load.start()
        if not state.get("failed_over"):
            result["drills"]["doctor"] = drill_doctor(state, checks)
        if state.get("failed_over"):
            log("\n== failover: skipped, an earlier drill promoted this cluster's standby and it has "
                "none now (`scripts/cluster.sh down` and `up` for a fresh one)")
        else:
            result["drills"]["failover"] = drill_failover(state, load, checks, args.detect)
    finally:
        if load:
            load.stop()
        if owned and not args.keep:
            down()
    result["failed_checks"] = checks.failed
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"cluster-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    log(f"\nresults: {path}")
    if checks.failed:
        log(f"{len(checks.failed)} check(s) failed:\n  " + "\n  ".join(checks.failed))
        return 1
    log("every drill held its bounds")
    return 0


def known_ids(state):
    """Ids of existing todos on the writer, for the readers of a fresh load."""
    return [int(x) for x in psql(state[state["writer"]]["port"], "SELECT id FROM todos ORDER BY id LIMIT 50").split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the cluster and leave it running")
    u.add_argument("--replicas", type=int, default=REPLICAS)
    u.add_argument("--port", type=int, default=None, help="HAProxy's port (default: a free one)")
    sub.add_parser("status", help="where everything is")
    sub.add_parser("down", help="stop everything and remove the cluster's files")
    d = sub.add_parser("drill", help="run the drills under load (bringing a cluster up and down if none is)")
    d.add_argument("--clients", type=int, default=12, help="closed-loop clients during the fault drills")
    d.add_argument("--seconds", type=int, default=5, help="length of each throughput run")
    d.add_argument("--pause", type=float, default=3.0, help="how long PgBouncer stays PAUSEd")
    d.add_argument("--detect", type=float, default=2.0, help="failover: seconds from the kill to the promotion")
    d.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = ap.parse_args()
    if args.command == "up":
        state = up(args)
        log(f"\nup. Try:\n  scripts/cluster.sh status\n  curl -s http://127.0.0.1:{state['haproxy']['port']}/ready")
        return 0
    if args.command == "down":
        down()
        return 0
    if args.command == "status":
        return status()
    return drill(args)


if __name__ == "__main__":
    sys.exit(main())
