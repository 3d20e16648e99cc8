#!/usr/bin/env python3
"""Provision todo-service's alert rules into SigNoz through its API, idempotently.

SigNoz cannot load rules from files at startup (its file loader was removed), so this script
creates them through the API once SigNoz is healthy. A rule is matched by its `alert` name: an
existing one is updated (PUT), a missing one created (POST), so re-running never duplicates.

Standard library only, so it runs anywhere Python 3.8+ does (a `python:3-alpine` one-shot service
in compose, or a laptop).

Environment:
  SIGNOZ_URL          SigNoz's UI/API address (default http://localhost:8080)
  SIGNOZ_API_KEY      an API key (sent as SIGNOZ-API-KEY), or:
  SIGNOZ_EMAIL, SIGNOZ_PASSWORD
                      an admin login (SigNoz's email/password session flow)
  SIGNOZ_WAIT         seconds to wait for /api/v1/health (default 300)
  RULES_DIR           directory of rule JSON files (default: alerts/ beside this script)

Exit status: 0 when every rule is in place, 1 otherwise (each failure is printed).
"""

import glob
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def request(method, url, headers, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=15) as res:
            raw = res.read()
            return res.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def wait_healthy(base, seconds):
    deadline = time.time() + seconds
    while True:
        try:
            status, _ = request("GET", base + "/api/v1/health", {})
            if status == 200:
                return True
        except OSError:
            pass
        if time.time() > deadline:
            return False
        time.sleep(2)


def auth_headers(base):
    key = os.environ.get("SIGNOZ_API_KEY")
    if key:
        return {"SIGNOZ-API-KEY": key}
    email, password = os.environ.get("SIGNOZ_EMAIL"), os.environ.get("SIGNOZ_PASSWORD")
    if not (email and password):
        sys.exit("error: set SIGNOZ_API_KEY, or SIGNOZ_EMAIL and SIGNOZ_PASSWORD")
    query = urllib.parse.urlencode({"email": email, "ref": base})
    status, ctx = request("GET", f"{base}/api/v2/sessions/context?{query}", {})
    if status != 200:
        sys.exit(f"error: session context for {email}: HTTP {status}: {ctx}")
    org_id = ctx["data"]["orgs"][0]["id"]
    status, session = request(
        "POST",
        base + "/api/v2/sessions/email_password",
        {},
        {"email": email, "password": password, "orgId": org_id},
    )
    if status != 200:
        sys.exit(f"error: login as {email}: HTTP {status}: {session}")
    return {"Authorization": "Bearer " + session["data"]["accessToken"]}


def existing_rules(base, headers):
    status, body = request("GET", base + "/api/v1/rules", headers)
    if status != 200:
        sys.exit(f"error: listing rules: HTTP {status}: {body}")
    data = body.get("data") if isinstance(body, dict) else None
    rules = data.get("rules", []) if isinstance(data, dict) else (data or [])
    return {r.get("alert"): r.get("id") for r in rules if isinstance(r, dict)}


def main():
    base = os.environ.get("SIGNOZ_URL", "http://localhost:8080").rstrip("/")
    rules_dir = os.environ.get(
        "RULES_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "alerts")
    )
    files = sorted(glob.glob(os.path.join(rules_dir, "*.json")))
    if not files:
        sys.exit(f"error: no rule files in {rules_dir}")
    if not wait_healthy(base, int(os.environ.get("SIGNOZ_WAIT", "300"))):
        sys.exit(f"error: {base}/api/v1/health did not answer 200")
    headers = auth_headers(base)
    current = existing_rules(base, headers)
    failed = 0
    for path in files:
        with open(path) as f:
            rule = json.load(f)
        name = rule["alert"]
        rule_id = current.get(name)
        if rule_id is None:
            status, body = request("POST", base + "/api/v1/rules", headers, rule)
            action = "created"
        else:
            status, body = request("PUT", f"{base}/api/v1/rules/{rule_id}", headers, rule)
            action = "updated"
        if 200 <= status < 300:
            print(f"{action}: {name} ({os.path.basename(path)})")
        else:
            failed += 1
            print(f"FAILED ({status}): {name} ({os.path.basename(path)}): {body}")
    print(f"{len(files) - failed} rules in place, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
