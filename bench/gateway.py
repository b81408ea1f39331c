"""The project's gateway emulator for the bench, with Nagle's algorithm off on its sockets.

``totango_emulator`` writes an answer's headers and its body in two ``send`` calls on a
kept-alive connection without ``TCP_NODELAY``; the body then waits for the client's delayed
ACK, about 40 ms on Linux, on every call but the first of a connection. A pooled session
(the worker) pays it on each call and a new connection per call (the naive relay) never
does, so the bench would measure the emulator, not the relay. A real gateway answers in one
segment. ``python -m bench.gateway`` takes the same arguments as ``python -m totango_emulator``.
"""

from __future__ import annotations

from totango_emulator import server as emulator

# socketserver.StreamRequestHandler sets TCP_NODELAY on the connection when this is true.
emulator._Handler.disable_nagle_algorithm = True

if __name__ == "__main__":
    raise SystemExit(emulator.main())
