#!/usr/bin/env python3
"""Provision todo-service's alert rules and dashboard into SigNoz through its API, idempotently.

SigNoz cannot load rules or dashboards from files at startup (its file loader was removed), so this
script creates them through the API once SigNoz is healthy. A rule is matched by its `alert` name
and a dashboard by its `title`: an existing one is updated (PUT), a missing one created (POST), so
re-running never duplicates. SigNoz's dashboard POST keeps only the title, so a new dashboard is
created and then PUT in full.

Standard library only, so it runs anywhere Python 3.8+ does (a `python:3-alpine` one-shot service
in compose, or a laptop).

Environment:
  SIGNOZ_URL          SigNoz's UI/API address (default http://localhost:8080, SigNoz's own
                      install; http://localhost:3301 from the host of this repository's compose
                      stack, http://signoz:8080 inside it)
  SIGNOZ_API_KEY      an API key (sent as SIGNOZ-API-KEY), or:
  SIGNOZ_EMAIL, SIGNOZ_PASSWORD
                      an admin login (SigNoz's email/password session flow)
  SIGNOZ_WAIT         seconds to wait for /api/v1/health (default 300)
  RULES_DIR           directory of rule JSON files (default: alerts/ beside this script)
  DASHBOARDS_DIR      directory of dashboard JSON files (default: dashboards/ beside this script)

Exit status: 0 when every rule and dashboard is in place, 1 otherwise (each failure is printed).
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


def existing_dashboards(base, headers):
    status, body = request("GET", base + "/api/v1/dashboards", headers)
    if status != 200:
        sys.exit(f"error: listing dashboards: HTTP {status}: {body}")
    items = body.get("data") if isinstance(body, dict) else body
    found = {}
    for d in items or []:
        if not isinstance(d, dict):
            continue
        title = (d.get("data") or {}).get("title")
        found[title] = d.get("id") or d.get("uuid")
    return found


def provision_dashboards(base, headers, files):
    current = existing_dashboards(base, headers)
    failed = 0
    for path in files:
        with open(path) as f:
            dashboard = json.load(f)
        title = dashboard["title"]
        dash_id = current.get(title)
        action = "updated"
        if dash_id is None:
            status, body = request("POST", base + "/api/v1/dashboards", headers, dashboard)
            data = body.get("data") if isinstance(body, dict) else None
            dash_id = (data or {}).get("id") or (data or {}).get("uuid")
            action = "created"
            if not (200 <= status < 300 and dash_id):
                failed += 1
                print(f"FAILED ({status}): dashboard {title}: {body}")
                continue
        status, body = request("PUT", f"{base}/api/v1/dashboards/{dash_id}", headers, dashboard)
        if 200 <= status < 300:
            print(f"{action}: dashboard {title} ({os.path.basename(path)})")
        else:
            failed += 1
            print(f"FAILED ({status}): dashboard {title}: {body}")
    return failed


def main():
    base = os.environ.get("SIGNOZ_URL", "http://localhost:8080").rstrip("/")
    rules_dir = os.environ.get(
        "RULES_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "alerts")
    )
    dashboards_dir = os.environ.get(
        "DASHBOARDS_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards")
    )
    files = sorted(glob.glob(os.path.join(rules_dir, "*.json")))
    if not files:
        sys.exit(f"error: no rule files in {rules_dir}")
    dashboard_files = sorted(glob.glob(os.path.join(dashboards_dir, "*.json")))
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
    dashboards_failed = provision_dashboards(base, headers, dashboard_files)
    print(
        f"{len(dashboard_files) - dashboards_failed} dashboards in place, "
        f"{dashboards_failed} failed"
    )
    return 1 if failed or dashboards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
