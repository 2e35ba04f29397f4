"""`{name}`-style placeholders in command, args, env, socket and workdir.

str.format would allow `{id.__class__}` and format specs; we accept bare names only.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

PLACEHOLDERS = ("name", "id", "data_dir", "socket", "config_dir", "port")


class TemplateError(ValueError):
    pass


def _fields(template: str) -> Iterable[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError as e:  # unbalanced braces
        raise TemplateError(f"{e} (write {{{{ and }}}} for literal braces)") from None


def check_template(template: str, allowed: Iterable[str] = PLACEHOLDERS) -> None:
    """Raise TemplateError for unknown placeholders, attribute access or format specs."""
    allowed = set(allowed)
    for _literal, field, spec, conversion in _fields(template):
        if field is None:
            continue
        if field not in allowed or spec or conversion:
            names = ", ".join("{" + a + "}" for a in sorted(allowed))
            raise TemplateError(f"unknown placeholder {{{field}}}; available: {names}")


def interpolate(template: str, values: Mapping[str, str]) -> str:
    """Substitute placeholders checked by check_template."""
    out: list[str] = []
    for literal, field, _spec, _conversion in _fields(template):
        out.append(literal)
        if field is not None:
            if field not in values:
                raise TemplateError(f"unknown placeholder {{{field}}}")
            out.append(values[field])
    return "".join(out)
