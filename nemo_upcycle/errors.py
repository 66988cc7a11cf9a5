"""One error type for bad input: a single line that names the problem and the fix.

The CLI prints ``error: <message>`` for it and exits with code 2 (the argparse convention for usage
errors). Anything else is a bug and keeps its traceback.

A refusal about named fields (the core's options, the planning layout) is a ``FieldError``: it keeps its template
and the fields' values, and each edge renders the fields by its own names (the CLI by its flags, ``--topk 9``; the
Hydra recipes by their keys, ``moe.moe_router_topk=9``); a caller with no edge of its own reads the field names.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

_SLOT = re.compile(r"\{(\w+)([=+]?)\}")


class UpcycleError(ValueError):
    """Bad input or an impossible option; the message is one line: what is wrong, then how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    def render(self, names: Optional[Mapping[str, str]] = None, sep: str = "=") -> str:
        """The message as an edge shows it (a plain error names no field: the same text everywhere)."""
        return str(self)


class FieldError(UpcycleError):
    """An ``UpcycleError`` whose template names fields by slots, each edge filling in its own names:

    ``{field}`` the field's name, ``{field=}`` its name and value (``sep`` between: ``=`` for keys, `` `` for flags),
    ``{field+}`` the name and, when the edge calls it otherwise, the field in parentheses. ``values`` holds every
    field the template names (the value of a ``{field}`` slot is not shown).
    """

    def __init__(self, template: str, /, **values):
        self.template, self.values = template, values
        self.names: Mapping[str, str] = {}
        self.sep = "="
        super().__init__(self.render())

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the message names, in order."""
        return tuple(dict.fromkeys(m.group(1) for m in _SLOT.finditer(self.template)))

    def render(self, names: Optional[Mapping[str, str]] = None, sep: str = "=") -> str:
        """The message in an edge's ``names`` (field -> name); an error an inner edge has named already (``named``:
        a recipe error that reaches the CLI through ``compare``) keeps that edge's names."""
        names, sep = (self.names, self.sep) if self.names else (names or {}, sep)

        def slot(m: re.Match) -> str:
            field, kind = m.group(1), m.group(2)
            name = names.get(field, field)
            if kind == "=":
                return f"{name}{sep}{self.values[field]!r}"
            if kind == "+" and name != field:
                return f"{name} ({field})"
            return name

        return " ".join(_SLOT.sub(slot, self.template).split())

    def named(self, names: Mapping[str, str], sep: str = "=") -> "FieldError":
        """The same error, named by an edge: its message (``str``) and every later ``render`` use ``names``."""
        err = FieldError(self.template, **self.values)
        err.names, err.sep = dict(names), sep
        err.args = (err.render(),)
        return err
