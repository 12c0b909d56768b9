"""Runs as its own process (by path, so it imports sympy but not torch): reads JSON lines
{"a": ..., "b": ...} and writes {"equal": true | false | null} (null: could not parse)."""

import json
import sys

from sympy import simplify
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

TRANSFORMS = (*standard_transformations, implicit_multiplication_application, convert_xor)


def parse(text: str):
    if "=" in text:  # an equation: compare lhs - rhs
        lhs, rhs = text.split("=", 1)
        return parse_expr(lhs, transformations=TRANSFORMS) - parse_expr(
            rhs, transformations=TRANSFORMS
        )
    return parse_expr(text, transformations=TRANSFORMS)


def equal(a: str, b: str) -> bool | None:
    try:
        pa, pb = parse(a), parse(b)
        if simplify(pa - pb) == 0:
            return True
        # equations as lhs - rhs: "y = 2x" and "2x = y" differ in sign only
        return "=" in a and "=" in b and bool(simplify(pa + pb) == 0)
    except Exception:  # sympy raises many kinds on text that is not maths
        return None


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps({"equal": equal(request["a"], request["b"])}), flush=True)


if __name__ == "__main__":
    main()
