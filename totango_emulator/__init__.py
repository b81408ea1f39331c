"""A stand-in for Totango's collection gateway: a small, real HTTP server on ``pixel.gif``
with programmable failures, for the tests, the demo, the benchmark and docker compose.

It is not part of the worker's runtime: production workers never import it.
"""

from totango_emulator.server import PIXEL_GIF, Call, GatewayEmulator

__all__ = ["PIXEL_GIF", "Call", "GatewayEmulator"]
