"""Test inputs and fakes: real objects built cheaply, never mocks.

Import them as ``tests.fakes.<module>``; the ``tests`` directory is a package so that
hypothesis tests can share module-level (session-cached) helpers with fixtures.
"""
