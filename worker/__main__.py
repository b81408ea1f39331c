"""``python -m worker``: the operator's command line (see ``worker.cli``)."""

from worker.cli import main

raise SystemExit(main())
