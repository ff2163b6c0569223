"""The factory's index page (HTML, Jinja2 with autoescape): schematics with their
extensions and kernel arguments (secrets redacted: the data comes from
``Factory.index``), each image's build state and artefact links, and the extensions."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any


def size(value: Any) -> str:
    """A byte count for people: ``512 B``, ``4.9 MiB``."""
    number = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if number < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return str(value)


def templates(package: str) -> Any:
    """A Jinja2 environment for the ``templates`` directory of ``package``: autoescape,
    strict undefined names, the ``size`` filter (the factory's pages and the fleet's UI)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["size"] = size
    return env


@cache
def _environment() -> Any:
    return templates("basalt.factory")


def render_index(index: dict[str, Any], base: str) -> str:
    """The page for ``Factory.index()``; links start with ``base`` (the mount point)."""
    text: str = _environment().get_template("index.html").render(index=index, base=base)
    return text


@cache
def stylesheet() -> bytes:
    return (resources.files("basalt.factory") / "templates" / "factory.css").read_bytes()


__all__ = ["render_index", "size", "stylesheet", "templates"]
