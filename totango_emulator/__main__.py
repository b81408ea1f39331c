"""``python -m totango_emulator``: serve the gateway emulator until SIGTERM or SIGINT."""

from totango_emulator.server import main

raise SystemExit(main())
