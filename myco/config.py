"""Settings from `MYCO_*` variables and flags; a value that does not fit raises `ConfigError`
naming the variable (`MYCO_GATEWAY_PORT`) or the flag (`--memory-limit`) it came from."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

import msgspec

from myco.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: the system picks a free one
_S = TypeVar("_S", bound=msgspec.Struct)


def from_env(kind: type[_S], prefix: str, environ: Mapping[str, str],
             flags: Mapping[str, object], defaults: Mapping[str, object],
             parsers: Mapping[str, Callable[[str], object]] | None = None) -> _S:
    """`kind` from `defaults`, overridden by `{prefix}FIELD` variables, overridden by flags
    (None: not given); a string for a field in `parsers` goes through it first (ValueError if
    it does not fit); strings convert to numbers as msgspec's lax mode does."""
    values, where = dict(defaults), {}
    for field in kind.__struct_fields__:
        if (env := environ.get(prefix + field.upper())) is not None:
            values[field], where[field] = env, prefix + field.upper()
    for field, flag in flags.items():
        if flag is not None:
            values[field], where[field] = flag, "--" + field.replace("_", "-")
    for field, parse in (parsers or {}).items():
        if isinstance(text := values.get(field), str):
            try:
                values[field] = parse(text)
            except ValueError as exc:
                raise ConfigError(where.get(field, field), str(exc)) from None
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:  # "Expected `int`, got `str` - at `$.port`"
        reason, _, at = str(exc).partition(" - at `$.")
        field = re.split(r"[.\[`]", at)[0]
        raise ConfigError(where.get(field, field), f"{values.get(field)!r}: {reason}") from None
