"""Taking an option of our own out of a command line that goes on to one of Flower's commands."""

from __future__ import annotations


def pop_option(args: list[str], name: str, default: str | None = None) -> tuple[str | None, list[str]]:
    """The value of `name v` or `name=v` in args (the last one wins; `default` if absent), and args without it."""
    rest, value, i = [], default, 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest
