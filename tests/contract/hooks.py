"""Schemathesis hooks for scripts/contract.sh.

Two answers to schema-valid requests are right and depend on state, not on the request's shape:
412 precondition_failed (an If-Match naming a version the todo is no longer at) and 422
idempotency_key_reused (a key already used for another body). schemathesis.toml lets 412 and 422
through its positive-data check; this check then holds every 412/422 to a schema-valid request to
those two codes, so a validation_failed (the service refusing what its document allows) still
fails the run.
"""

import json

import schemathesis

STATE_DEPENDENT = {412: "precondition_failed", 422: "idempotency_key_reused"}


@schemathesis.check
def refusals_of_valid_requests_are_only_state_conflicts(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    expected = STATE_DEPENDENT.get(response.status_code)
    if expected is None:
        return None
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        code = None
    if code != expected:
        raise AssertionError(
            f"a schema-valid request was refused {response.status_code} {code}: only "
            f"{expected} may answer it with {response.status_code}"
        )
    return None
