"""The sandbox chat templates render in: a template is code shipped with a checkpoint.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python's internals; this one
also bounds what it may cost, since a server renders one per request: a render that runs past
RENDER_SECONDS (nested loops over `range`, calls in a loop) or builds a string or list over
MAX_ITEMS (`'x' * 10**9`, doubling in a loop) stops with a TemplateError.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

RENDER_SECONDS = 5.0
MAX_ITEMS = 16 << 20  # characters of a string, items of a list

_local = threading.local()


def _check_deadline() -> None:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateError(f"rendering took over {RENDER_SECONDS:g} s")


def _bounded_range(*args: int) -> Iterator[int]:
    for i in safe_range(*args):  # jinja's own limit on one range's length
        _check_deadline()
        yield i


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+", "**"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals["range"] = _bounded_range

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        sizes = (_size(left), _size(right))
        if operator == "*" and any(s is not None for s in sizes):
            count = right if sizes[0] is not None else left
            if isinstance(count, int) and max(s or 0 for s in sizes) * count > MAX_ITEMS:
                raise TemplateError(f"a template value grew past {MAX_ITEMS} items")
        if operator == "**" and isinstance(right, int) and right > 1024:
            raise TemplateError("a template power is too large")
        result = super().call_binop(context, operator, left, right)
        if (_size(result) or 0) > MAX_ITEMS:
            raise TemplateError(f"a template value grew past {MAX_ITEMS} items")
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)


def render(template: Any, **variables: Any) -> str:
    """template.render(**variables), stopped past RENDER_SECONDS."""
    _local.deadline = time.monotonic() + RENDER_SECONDS
    try:
        return template.render(**variables)
    finally:
        _local.deadline = None
