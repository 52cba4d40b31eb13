"""A pydantic ValidationError as this project's one-line message: where, what it must be, what was given.

Validators say what is wrong (ValueError, PydanticCustomError) after the place they
check: `must be ...`, or `.key ...` / `: ...` for a part of it; a type says what its
values must be with `must`. The boundary (from_dict, parse_search, ...) raises
`one_line`'s message as a UserError.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

# what pydantic's own constraints say, after "must be"
SAID = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
        "less_than_equal": "<= {le}", "finite_number": "a finite number"}


def must(want: str, keep: tuple[str, ...] = tuple(SAID)) -> WrapValidator:
    """A type whose failures say `must be <want>, got <value>` (those in `keep`, its bounds, as they are)."""
    def said(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            if e.errors()[0]["type"] in keep:
                raise
            raise PydanticCustomError("must", "must be {want}, got {got}", {"want": want, "got": repr(value)}) from None
    return WrapValidator(said)


def one_line(error: ValidationError, where: str = "") -> str:
    """The first problem of `error`, placed: `where` is the dotted place of what was validated
    ("search"), or "config" for a Config, whose keys (also given on the command line) are
    named `config key 'tau1'`, as are those of an experiment file's config: section."""
    first = error.errors()[0]
    # a union keyed by its one key (refilled.schema.search.Distribution) says that key twice
    loc = [str(p) for i, p in enumerate(first["loc"]) if not i or p != first["loc"][i - 1]]
    if loc[:1] == ["config"] and not where:
        where, loc = "config", loc[1:]
    if where == "config":  # what its validators say of the whole config names its keys itself
        place = f"config key '{loc[0]}'" if loc else ""
    else:
        place = ".".join(filter(None, [where, *loc]))
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind == "unknown_setting":
        return f"{place}: unknown setting '{ctx['name']}' ({place} takes {ctx['takes']})"
    if kind in SAID:
        text = f"must be {SAID[kind].format(**ctx)}, got {first['input']!r}"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected'].replace(chr(39), '')}, got {first['input']!r}"
    elif kind in ("model_type", "dict_type"):
        text = f"must be a mapping of settings, got {first['input']!r}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:  # this project's own words (PydanticCustomError), or pydantic's
        text = first["msg"]
    return f"{place}{'' if not place or text[:1] in ('.', ':') else ' '}{text}"
