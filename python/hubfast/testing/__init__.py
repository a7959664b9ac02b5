"""Test helpers, never imported by hubfast itself: fault injection for the server
(``faults``), throwaway TLS certificates (``certs``), model builders (``models``), the chaos
soak (``chaos``), the demo (``demo``) and the processes and hosts tests spawn (``worker``,
``cluster``).

The server they run against is production code: ``hubfast.server``.
"""
