"""Schemathesis hooks of the OpenAPI conformance test (../openapi_conformance.rs).

- Path parameters: the generated values, or (as often) the ids of what the test seeded
  (`DROVER_CONFORMANCE_SEEDS`: {path template: {parameter: value}}), so that operations
  reach real runs, environments, webhooks... and not only 404s.
- A lease long-polls up to `wait_ms` (20 s when left out): the wait is kept to a few
  milliseconds, so that the fuzzer does not sit on an empty task queue.
- The authenticated run sends a credential: the administrator's API token
  (`DROVER_CONFORMANCE_TOKEN`), and on the worker endpoints a worker's service token
  (`DROVER_CONFORMANCE_WORKER_TOKEN`), where a user's credential only gets 403s.
- An `Idempotency-Key` is made unique to its request: a generated key repeated with
  another body is refused (422 `idempotency_key_reused`, as documented), which says
  nothing of the body. (Replays are tested in security.rs.)
- A request accepted with an undeclared header is not reported as schema-violating
  data accepted: HTTP servers ignore headers they do not know.
- The authenticated run never revokes the fuzzer's own token nor changes its own user's
  role (`DROVER_CONFORMANCE_SELF`: {"token": id, "user": name}): every later request would
  be a 401 or 403 and test nothing else.
"""

import itertools
import json
import os
import re

import schemathesis
from hypothesis import strategies as st

SEEDS = json.loads(os.environ.get("DROVER_CONFORMANCE_SEEDS", "{}"))
SELF = json.loads(os.environ.get("DROVER_CONFORMANCE_SELF", "{}"))
TOKEN = os.environ.get("DROVER_CONFORMANCE_TOKEN")
WORKER_TOKEN = os.environ.get("DROVER_CONFORMANCE_WORKER_TOKEN")
WORKER_ENDPOINTS = {"/api/v1/workers/config", "/api/v1/tasks/lease", "/api/v1/worker-messages"}

LEASE = "/api/v1/tasks/lease"
IDEMPOTENCY_KEY = re.compile(r"^[!-~]{1,200}$")
keys_sent = itertools.count()
LEASE_WAIT_MS = 20


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    seeded = SEEDS.get(context.operation.path)
    if not seeded or not isinstance(path_parameters, dict):
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **seeded}])


@schemathesis.hook
def map_body(context, body):
    if context.operation.path != LEASE or not isinstance(body, dict):
        return body
    wait = body.get("wait_ms")
    is_number = isinstance(wait, int) and not isinstance(wait, bool)
    # An invalid `wait_ms` (a negative case) is left for the server to refuse.
    if wait is None or (is_number and wait > LEASE_WAIT_MS):
        return {**body, "wait_ms": LEASE_WAIT_MS}
    return body


@schemathesis.hook
def filter_case(context, case):
    parameters = case.path_parameters or {}
    operation = (case.method.upper(), context.operation.path)
    if operation == ("DELETE", "/api/v1/tokens/{id}"):
        return parameters.get("id") != SELF.get("token")
    if operation == ("PATCH", "/api/v1/users/{name}"):
        return parameters.get("name") != SELF.get("user")
    return True


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = dict(case.headers or {})
    token = WORKER_TOKEN if context.operation.path in WORKER_ENDPOINTS else TOKEN
    if token:
        headers["Authorization"] = f"Bearer {token}"
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and IDEMPOTENCY_KEY.match(key):
        headers["Idempotency-Key"] = f"{key}-{next(keys_sent)}"
    case.headers = headers


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # An undeclared header is no invalid request: HTTP servers ignore headers they do not
    # know (RFC 9110, section 5.1), and so does drover.
    data = case.meta.phase.data if case.meta is not None else None
    location = getattr(data, "parameter_location", None)
    only_an_unknown_header = (
        failure.code == "ST201"
        and location is not None
        and location.name == "HEADER"
        and "unexpected properties" in (getattr(data, "description", None) or "")
    )
    return not only_an_unknown_header
