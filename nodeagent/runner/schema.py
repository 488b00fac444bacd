"""Checks on the tools and JSON schemas of a chat request, made before any grammar is built.

llama-cpp-python turns a schema into a GBNF grammar in Python, llama.cpp parses that in C++;
neither expects hostile input (a grammar that does not parse segfaults the runner at the first
token, 100,000 repetitions overflow the C++ parser's stack, a `$ref` cycle recurses).  So
`check_chat` refuses with a `BadRequest` naming the parameter: more than MAX_TOOLS tools, a
function name unlike OpenAI's ^[a-zA-Z0-9_-]{1,64}$, schemas of more than MAX_BYTES in all or
nested deeper than MAX_DEPTH, sub-schemas that are not objects, unknown types, UNSUPPORTED
keywords (the grammar would not enforce them), empty enum/anyOf/oneOf/allOf, lengths, item
counts and pattern repetitions above MAX_REPEAT, and a `$ref` that is not "#/..." or cycles.
What still fails to convert or parse is refused by `generate.prepare`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from myco.errors import BadRequest

if TYPE_CHECKING:  # wire calls check_chat from decode
    from nodeagent.runner.wire import ChatRequest

MAX_TOOLS, MAX_DEPTH, MAX_BYTES, MAX_REPEAT = 128, 32, 128 * 1024, 1000
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "contains", "minContains",
    "maxContains", "uniqueItems", "minProperties", "maxProperties", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "$dynamicRef", "$recursiveRef"})
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_chat(body: ChatRequest) -> None:
    """Refuse tools and response formats that no safe grammar can be built from."""
    tools = body.tools or []
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    schemas = []
    for i, tool in enumerate(tools):
        if not TOOL_NAME.fullmatch(tool.function.name):
            raise BadRequest("a function name must match ^[a-zA-Z0-9_-]{1,64}$",
                             param=f"tools[{i}].function.name")
        schemas.append((f"tools[{i}].function.parameters", tool.function.parameters))
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        schemas.append(("response_format.json_schema.schema", fmt.json_schema.schema))
    if (size := sum(len(msgspec.json.encode(schema)) for _, schema in schemas)) > MAX_BYTES:
        raise BadRequest(f"the tools and schemas take {size} bytes of JSON, at most "
                         f"{MAX_BYTES}", param=schemas[-1][0])
    for param, schema in schemas:
        _Walk(param, schema).schema(schema, param, 0)


class _Walk:
    """One schema: every sub-schema visited once, `$ref`s followed with a cycle check."""

    def __init__(self, param: str, root: dict[str, Any]) -> None:
        self.param, self.root = param, root
        self.open: set[str] = set()  # refs being checked: meeting one again is a cycle
        self.done: set[str] = set()

    def fail(self, where: str, why: str) -> BadRequest:
        return BadRequest(f"{where[:200]}: {why}", param=self.param)

    def schema(self, node: Any, where: str, depth: int) -> None:
        if not isinstance(node, dict):
            raise self.fail(where, "a schema must be a JSON object")
        if depth > MAX_DEPTH:
            raise self.fail(where, f"schemas may nest at most {MAX_DEPTH} deep")
        if unsupported := sorted(UNSUPPORTED.intersection(node)):
            raise self.fail(where, f"`{unsupported[0]}` is not supported: the grammar "
                                   "could not enforce it")
        types = node.get("type", [])
        if any(type(t) is not str or t not in TYPES
               for t in (types if isinstance(types, list) else [types])):
            raise self.fail(where, f"unknown type in {str(types)[:60]}")
        for key in ("enum", "anyOf", "oneOf", "allOf", "prefixItems", "required"):
            if key in node and (not isinstance(node[key], list) or (not node[key]
                                and key != "required")):
                raise self.fail(where, f"`{key}` must be a non-empty list")
        self.counts(node, where)
        if "$ref" in node:
            self.ref(node["$ref"], where, depth)
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for i, sub in enumerate(node.get(key, [])):
                self.schema(sub, f"{where}.{key}[{i}]", depth + 1)
        for key in ("properties", "$defs", "definitions"):
            if not isinstance(subs := node.get(key, {}), dict):
                raise self.fail(where, f"`{key}` must be an object")
            for name, sub in subs.items():
                self.schema(sub, f"{where}.{key}.{name[:40]}", depth + 1)
        items = node.get("items", [])
        for sub in items if isinstance(items, list) else [items]:
            self.schema(sub, f"{where}.items", depth + 1)
        if not isinstance(node.get("additionalProperties", True), bool):
            self.schema(node["additionalProperties"], f"{where}.additionalProperties", depth + 1)

    def counts(self, node: dict[str, Any], where: str) -> None:
        if not isinstance(pattern := node.get("pattern", ""), str):
            raise self.fail(where, "`pattern` must be a string")
        bounds = [node.get(k, 0) for k in ("minLength", "maxLength", "minItems", "maxItems")]
        bounds += [int(n) for found in _QUANTIFIER.finditer(pattern) for n in found.groups() if n]
        if any(type(n) is not int or not 0 <= n <= MAX_REPEAT for n in bounds):
            raise self.fail(where, f"lengths, item counts and repetitions must be integers "
                                   f"from 0 to {MAX_REPEAT}")
        if bounds[0] > node.get("maxLength", MAX_REPEAT) or \
                bounds[2] > node.get("maxItems", MAX_REPEAT):
            raise self.fail(where, "a minimum length or item count is above its maximum")

    def ref(self, ref: Any, where: str, depth: int) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(where, "`$ref` must point into the same schema (\"#/...\")")
        if ref == "#" or ref in self.open:
            raise self.fail(where, f"recursive `$ref` {ref[:100]!r}")
        if ref in self.done:
            return
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.fail(where, f"`$ref` {ref[:100]!r} points to nothing")
            target = target[part]
        self.open.add(ref)
        self.schema(target, f"{where}.$ref", depth + 1)
        self.open.discard(ref)
        self.done.add(ref)
