"""Basalt's image factory (``basalt-factory``): schematics in, images out, over HTTP.

A client posts a schematic (YAML) and gets its id; the first request for one of that
image's files queues its build (one at a time, in a child process running the imager,
with progress to see), and every later one is served from disk with ranges and the
file's sha256 as its entity tag. ``basalt-fleet`` mounts the same routes under
``/factory/`` with its roles. docs/factory.md describes it.

Nothing is imported here: the build process (``worker``) must not pay for the web
parts, and the web parts load only when served.
"""
