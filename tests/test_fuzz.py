"""schemathesis, a property-based fuzzer, over gateway/openapi.yaml against a real gateway in
front of the session's real node (the real model).

Every operation of the description gets a fixed number of generated requests, schema-valid
(positive) and schema-violating (negative), from a fixed seed.  Each answer must:

- not be a 5xx (a 502: the runner went down), nor take longer than `REQUEST_TIMEOUT`;
- be in OpenAI's error envelope when it is an error, and as the description documents
  (status, content type, body schema: schemathesis's own conformance checks);
- be a refusal, never a generation, when `max_tokens`/`max_completion_tokens` is outside
  [1, the context];
- not end a stream in an in-band error.

The run starts with the single requests of issue 9 that took the runner down, answered 500
or generated until the context was full (`SEEDS`).  After it, an honest one-token chat request
must answer within `HONEST_S`: the fuzz left nothing generating or queued.

The description is fuzzed as written with three narrowings, so the budget holds on a small
CPU: `model` is often the served model (else no request would reach the model), the
generation budget is 1..8 or out of range (0, negative, >= 2**31: each must be a 400), and a
request that asks for no budget, or a budget in 9..2**31 that the negative mode makes up, is
sent with 8 (absent means "the context left": minutes here, and not what this test is for).
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from schemathesis import Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import MODEL_ID
from tests.procs import ROOT, Proc

SPEC = ROOT / "gateway" / "openapi.yaml"
N_CTX = 1024  # the session node's --n-ctx (tests/conftest.py)
MAX_TOKENS = 8
REQUEST_TIMEOUT = 20.0  # seconds: far above 8 tokens of a 270M model on a busy 2-core box
HONEST_S = 5.0
MAX_HANGS = 3  # then stop sending: each costs REQUEST_TIMEOUT, the failure is known
# (path, method, positive examples, negative examples)
BUDGET = [
    ("/v1/chat/completions", "POST", 50, 20),
    ("/v1/completions", "POST", 20, 10),
    ("/v1/embeddings", "POST", 12, 8),
    ("/v1/responses", "POST", 20, 10),
    ("/v1/responses/{response_id}", "GET", 3, 0),  # no id is invalid: no negative
    ("/v1/responses/{response_id}", "DELETE", 3, 0),
    ("/v1/messages", "POST", 20, 10),
    ("/v1/messages/count_tokens", "POST", 8, 4),
    ("/v1/policy/dry-run", "POST", 25, 12),
    ("/v1/models", "GET", 2, 0),
    ("/v1/policy", "GET", 2, 0),
    ("/v1/swarm", "GET", 2, 0),
    ("/health", "GET", 2, 0),
    ("/v1/identity", "GET", 2, 0),
]
BUDGET_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
ANTHROPIC = "/v1/messages"  # its paths answer errors in Anthropic's shape
_HI = [{"role": "user", "content": "hi"}]
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
_LOOP = {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {
    "a": {"$ref": "#/$defs/a"}}}}}
# Sent before the generated requests: the single requests of issue 9 that took the runner
# down, answered 500, or generated until the context was full (each over a valid `BASES`).
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL_ID, "max_tokens": MAX_TOKENS, "messages": _HI},
    "/v1/completions": {"model": MODEL_ID, "max_tokens": MAX_TOKENS, "prompt": "hi"},
    "/v1/responses": {"model": MODEL_ID, "max_output_tokens": MAX_TOKENS, "input": "hi"},
    "/v1/messages": {"model": MODEL_ID, "max_tokens": MAX_TOKENS, "messages": _HI}}
SEEDS: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": []}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": _LOOP}}},
        {"tools": [{"type": "function", "function": {"name": 'a"b'}}],
         "tool_choice": "required"},
        {"tools": [_TOOL] * 1000},
        {"messages": [{"role": "user", "content": "word " * 3 * N_CTX}]},
        {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 2**63},
        {"max_completion_tokens": 2**64}],
    "/v1/completions": [{"prompt": "word " * 3 * N_CTX}, {"max_tokens": 0}],
    # The translated APIs: a plain and a streamed answer (random bodies rarely are valid).
    "/v1/responses": [{}, {"stream": True}, {"input": [{"type": "function_call"}]}],
    "/v1/messages": [{}, {"stream": True}, {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": [{"type": "image"}]}]}]}],
}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def narrowed(description: dict[str, Any]) -> dict[str, Any]:
    """The description with the narrowings of the module docstring."""
    schema = copy.deepcopy(description)
    components = schema["components"]["schemas"]
    # Disjoint branches: hypothesis-jsonschema folds {"enum": [x]} into a wider string schema.
    components["Model"] = {"anyOf": [{"const": MODEL_ID},
                                     {**components["Model"], "not": {"const": MODEL_ID}}]}
    components["TokenBudget"] = {"anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        {"enum": [0, -1, 2**31, 2**63, 2**64]},
        {"type": "integer", "maximum": 0},
        {"type": "integer", "minimum": 2**31}]}
    return schema


def bounded(case: Case[Any]) -> None:
    """Give a generation request that names no budget, or a budget in 9..2**31 (which the
    negative mode makes up), `MAX_TOKENS` instead."""
    body = case.body
    if case.method != "POST" or not isinstance(body, dict) or "dry-run" in case.path \
            or "embeddings" in case.path:
        return
    for key in BUDGET_KEYS:
        value = _integer(body.get(key))
        if value is not None and MAX_TOKENS < value < 2**31:
            body[key] = MAX_TOKENS
    if all(body.get(key) is None for key in BUDGET_KEYS):
        body["max_output_tokens" if "responses" in case.path else "max_tokens"] = MAX_TOKENS


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def out_of_range(case: Case[Any]) -> str | None:
    body = case.body
    if not isinstance(body, dict) or "dry-run" in case.path or "count_tokens" in case.path:
        return None
    for key in BUDGET_KEYS:
        value = _integer(body.get(key))
        if value is not None and not 1 <= value <= N_CTX:
            return f"{key}={value}"
    return None


def envelope_problem(response: schemathesis.Response, path: str) -> str | None:
    """Why an error answer is not OpenAI's envelope, or Anthropic's on its paths (None: it
    is)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return "error body is not JSON"
    if path.startswith(ANTHROPIC):
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or body.get("type") != "error" or set(body) != {
                "type", "error"} or set(error) != {"type", "message"} or not all(
                isinstance(v, str) for v in error.values()):
            return "error body is not Anthropic's {\"type\": \"error\", \"error\": {...}}"
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(error, dict):
        return "error body is not {\"error\": {...}}"
    if set(error) != {"message", "type", "param", "code"}:
        return f"error fields are {sorted(error)}, not message/type/param/code"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str) \
            or not all(v is None or isinstance(v, str) for v in (error["param"], error["code"])):
        return "error fields have the wrong types"
    return None


def judge(case: Case[Any], response: schemathesis.Response) -> list[str]:
    """What is wrong with this answer to this request."""
    status, problems = response.status_code, []
    if status >= 500:  # the node is healthy and asked one request at a time: never
        problems.append(f"status {status}")
    if status >= 400:
        problem = envelope_problem(response, case.path)
        if problem:
            problems.append(problem)
    budget = out_of_range(case)
    if budget is not None and status < 400:
        problems.append(f"{budget} is outside [1, {N_CTX}] but got {status}, not a 400")
    if status == 200 and response.headers.get("content-type", [""])[0].startswith(
            "text/event-stream") and any(failed in response.content for failed in (
                b'data: {"error"', b"event: error", b"event: response.failed")):
        problems.append("the stream ended in an in-band error")
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        problems += [f"{f.title}: {f.message[:300]}" for f in group.exceptions]
    return problems


def describe(case: Case[Any], base_url: str) -> str:
    curl = case.as_curl_command(base_url=base_url)
    return curl if len(curl) < 1500 else curl[:1500] + "...(cut)"


Statuses = Counter[tuple[str, int]]  # (path, status): how many; status 0: no answer


def fuzz(schema: schemathesis.BaseSchema, base_url: str, path: str, method: str,
         mode: GenerationMode, examples: int, report: Callable[[str], None],
         statuses: Statuses) -> None:
    """Send `examples` generated requests to one operation; report each problem."""
    session, operation = requests.Session(), schema[path][method]

    def unanswered() -> int:
        return sum(n for (_, status), n in statuses.items() if status == 0)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def probe(case: Case[Any]) -> None:
        if unanswered() >= MAX_HANGS:
            return
        bounded(case)
        try:
            response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            statuses[path, 0] += 1
            why = f"no answer within {REQUEST_TIMEOUT} s" if isinstance(exc, requests.Timeout) \
                else f"{type(exc).__name__}: {exc}"
            report(f"{why}:\n  {describe(case, base_url)}")
            if unanswered() == MAX_HANGS:
                report(f"stopped sending after {MAX_HANGS} requests without an answer")
            return
        statuses[path, response.status_code] += 1
        for problem in judge(case, response):
            report(f"{problem} ({mode.value}):\n  {describe(case, base_url)}\n  -> "
                   f"{response.status_code} {response.content[:300]!r}")

    if mode == GenerationMode.POSITIVE:
        for seed in SEEDS.get(path, []):
            probe = example(case=operation.Case(body={**BASES[path], **seed},
                                                media_type="application/json"))(probe)
    try:
        probe()
    finally:
        session.close()


def chat(base_url: str, timeout: float) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=timeout, json={
        "model": MODEL_ID, "max_tokens": 1,
        "messages": [{"role": "user", "content": "Say hi."}]})


def test_the_description_is_openapi_31_and_lists_every_endpoint() -> None:
    schemathesis.openapi.from_path(SPEC).validate()
    description = yaml.safe_load(SPEC.read_text())
    for schema in description["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    documented = {(path, method.upper()) for path, operations in description["paths"].items()
                  for method in operations}
    assert documented == {(path, method) for path, method, *_ in BUDGET}


def test_fuzz_finds_no_500_no_hang_and_leaves_the_node_free(gateway: Proc) -> None:
    # Warm up outside the clock: the runner loads the model, and embeddings their context.
    assert chat(gateway.url, 120).status_code == 200
    assert httpx.post(f"{gateway.url}/v1/embeddings", timeout=120,
                      json={"model": MODEL_ID, "input": "hi"}).status_code == 200
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_dict(narrowed(yaml.safe_load(SPEC.read_text())),
                                            config=config)
    problems: list[str] = []
    statuses: Statuses = Counter()
    started = time.monotonic()
    for path, method, positive, negative in BUDGET:
        for mode, examples in ((GenerationMode.POSITIVE, positive),
                               (GenerationMode.NEGATIVE, negative)):
            if examples:
                fuzz(schema, gateway.url, path, method, mode, examples, problems.append,
                     statuses)
    fuzzed_s = time.monotonic() - started
    # Not vacuous: every endpoint answered some request in full (the model's included).
    problems += [f"no request to {path} was answered 200" for path, *_ in BUDGET
                 if not statuses[path, 200] and "{" not in path]  # stored ones: random ids

    honest_started = time.monotonic()
    honest = chat(gateway.url, REQUEST_TIMEOUT)
    honest_s = time.monotonic() - honest_started
    sent = sum(statuses.values())
    print(f"fuzz: {sent} requests in {fuzzed_s:.1f} s, by status "
          f"{sorted(Counter(status for (_, status) in statuses.elements()).items())}; "
          f"an honest request after: {honest_s:.2f} s")
    if honest.status_code != 200 or honest_s > HONEST_S:
        problems.append(f"after the fuzz run an honest 1-token chat request took "
                        f"{honest_s:.1f} s (limit {HONEST_S} s): {honest.status_code} "
                        f"{honest.text[:300]}")
    assert not problems, f"{len(problems)} problems in {sent} requests:\n\n" + \
        "\n\n".join(problems)
