"""The arm syntax: `STRATEGY[:TEMPERATURE]` or `NAME=KEY=VALUE[,KEY=VALUE...]`."""

from __future__ import annotations

import re
from typing import NamedTuple

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class Arm(NamedTuple):
    """One treatment: a name (its folder under OUT) and `--set` overrides."""

    name: str
    settings: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """`STRATEGY[:TEMPERATURE]` (named STRATEGY or STRATEGY-rTEMPERATURE) or
    `NAME=KEY=VALUE[,KEY=VALUE...]`, where commas inside {...}, [...] or quotes belong to
    the value."""
    if "=" not in text:
        strategy, colon, temperature = text.partition(":")
        if not NAME.fullmatch(strategy):
            raise ValueError(f"--arm {text!r}: expected STRATEGY[:TEMPERATURE], e.g. linupper:0.5")
        if not colon:
            return Arm(strategy, (f"reweight.strategy={strategy}",))
        try:
            float(temperature)
        except ValueError:
            raise ValueError(
                f"--arm {text!r}: the temperature {temperature!r} is not a number, e.g. linupper:0.5"
            ) from None
        settings = (f"reweight.strategy={strategy}", f"reweight.temperature={temperature}")
        return Arm(f"{strategy}-r{temperature}", settings)
    name, _, rest = text.partition("=")
    if not NAME.fullmatch(name):
        raise ValueError(
            f"--arm {text!r}: the name {name!r} must be letters, digits, '.', '_', '+' or '-'"
            " (it names the arm's folder), e.g. boilerplate-down=data.weights={...}"
        )
    settings = tuple(item.strip() for item in split_top_level(rest))
    for item in settings:
        key, equals, _ = item.partition("=")
        if not equals or not KEY.fullmatch(key.strip()):
            raise ValueError(
                f"--arm {text!r}: {item!r} is not KEY=VALUE with a dotted key; write"
                " NAME=section.key=value[,section.key=value], e.g."
                " r0.2=reweight.strategy=linupper,reweight.temperature=0.2"
            )
    return Arm(name, settings)


def split_top_level(text: str) -> list[str]:
    """Split at commas that are outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
