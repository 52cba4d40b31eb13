"""A pydantic ValidationError as this project's one-line message: where, what it must be, what was given.

Validators say what is wrong (ValueError, PydanticCustomError) after the place they
check: `must be ...`, or `.key ...` / `: ...` for a part of it; a type says what its
values must be with `must`. The boundary (from_dict, parse_search, ...) raises
`one_line`'s message as a UserError. A value in a message is `shown` (a few items and
characters of it) and a message is `flat` (one line, at most LONGEST characters).
"""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

# what pydantic's own constraints say, after "must be"
SAID = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
        "less_than_equal": "<= {le}", "finite_number": "a finite number"}


# A message is one line of at most this many characters: what a bad file holds is shown in part
# (a 500-byte YAML alias bomb holds millions of items; a string may be megabytes long).
LONGEST = 500
_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no arguments
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 80, 80, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxset = _SHOWN.maxfrozenset = _SHOWN.maxdict = 4


def shown(value: Any) -> str:
    """`value` as a message shows it: its repr, of a few items and characters at most, on one line."""
    return _SHOWN.repr(value)


def flat(text: str, limit: int = LONGEST) -> str:
    """`text` as one line of at most `limit` characters: what is not printable (line breaks,
    terminal escapes) escaped as repr escapes it, the middle of a long text left out."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else f"{text[:limit * 2 // 3]} ... {text[-(limit // 3 - 5):]}"


def must(want: str, keep: tuple[str, ...] = tuple(SAID)) -> WrapValidator:
    """A type whose failures say `must be <want>, got <value>` (those in `keep`, its bounds, as they are)."""
    def said(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            if e.errors()[0]["type"] in keep:
                raise
            raise PydanticCustomError("must", "must be {want}, got {got}", {"want": want, "got": shown(value)}) from None
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
        return flat(f"{place}: unknown setting {shown(ctx['name'])} ({place} takes {ctx['takes']})")
    if kind in SAID:
        text = f"must be {SAID[kind].format(**ctx)}, got {shown(first['input'])}"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected'].replace(chr(39), '')}, got {shown(first['input'])}"
    elif kind in ("model_type", "dict_type"):
        text = f"must be a mapping of settings, got {shown(first['input'])}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:  # this project's own words (PydanticCustomError), or pydantic's
        text = first["msg"]
    return flat(f"{place}{'' if not place or text[:1] in ('.', ':') else ' '}{text}")
