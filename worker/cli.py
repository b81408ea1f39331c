"""The command line: ``python -m worker dead-letters …``, ``health`` and ``demo``.

Installed as the console scripts ``totango-worker`` and ``totango-dead-letters``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from worker import deadletter
from worker.contract import DESIGNS, PLAIN
from worker.envelope import Envelope
from worker.errors import ConfigError
from worker.settings import Settings
from worker.state import StateStore

if TYPE_CHECKING:
    from celery import Celery

_RELATIVE_RE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _dead_letter_parser(commands.add_parser("dead-letters", help="read, replay, purge"))
    health = commands.add_parser("health", help="exit 0 if the worker's heartbeat is fresh")
    health.add_argument("--ready", action="store_true", help="only check that it is connected")
    health.add_argument("--max-age", type=float, help="seconds (TOTANGO_HEARTBEAT_MAX_AGE)")
    commands.add_parser("demo", help="the whole flow on one machine, no servers needed")
    queues = commands.add_parser("queues", help="the RabbitMQ work queues' design")
    queue_actions = queues.add_subparsers(dest="action", required=True)
    migrate = queue_actions.add_parser(
        "migrate", help="declare totango and totango.batch again in a design, moving messages"
    )
    migrate.add_argument("--to", choices=DESIGNS, default=PLAIN, help="the design (plain)")
    args = parser.parse_args(argv)
    try:
        if args.command == "health":
            return health_check(Settings.from_env(), args.ready, args.max_age)
        if args.command == "demo":
            from worker.demo import run_demo  # noqa: PLC0415  the demo pulls in the emulator

            return run_demo()
        if args.command == "queues":
            return migrate_queues(Settings.from_env(), args.to)
        return dead_letters(args)
    except ConfigError as exc:
        print(f"bad setting {exc}", file=sys.stderr)
        return 2


def migrate_queues(settings: Settings, design: str) -> int:
    """Stop the workers first: a deleted queue cancels its consumers."""
    if settings.broker_kind != "rabbitmq":
        print("only RabbitMQ queues have a design; nothing to migrate", file=sys.stderr)
        return 2
    from worker.migration import migrate  # noqa: PLC0415  kombu only for commands that need it
    from worker.producer_app import producer_app  # noqa: PLC0415

    app = producer_app(settings)  # publishes with confirms (transport_options)
    try:
        with app.connection_for_write() as connection:
            for moved in migrate(connection, design):
                print(f"{moved.queue}: {moved.design} design, {moved.messages} messages moved")
    finally:
        app.close()
    return 0


def dead_letters_main(argv: Sequence[str] | None = None) -> int:
    return main(["dead-letters", *(sys.argv[1:] if argv is None else argv)])


def health_check(settings: Settings, ready_only: bool, max_age: float | None) -> int:
    """Cheap by design: one stat() of the file the worker's consumer touches every 10 s."""
    path = Path(settings.heartbeat_file)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"not ready: {path} does not exist (consumer not connected)", file=sys.stderr)
        return 1
    limit = max_age if max_age is not None else settings.heartbeat_max_age
    if not ready_only and age > limit:
        print(f"unhealthy: heartbeat is {age:.0f}s old (limit {limit:.0f}s)", file=sys.stderr)
        return 1
    print(f"ok: heartbeat {age:.1f}s old")
    return 0


def _dead_letter_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="a table of entries, or JSON")
    listing.add_argument("--reason", help="exact code, or a prefix such as 'exhausted'")
    listing.add_argument("--since", help="ISO time, or relative: 30m, 2h, 1d")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one envelope, whole")
    show.add_argument("id")
    for name in ("replay", "purge"):
        action = sub.add_parser(name, help=f"{name} entries (asks first on a terminal)")
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument("--id")
        which.add_argument("--reason")
        which.add_argument("--all", action="store_true")
        action.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
        if name == "replay":
            action.add_argument("--dry-run", action="store_true")
            action.add_argument(
                "--rate", type=_positive, help="republish at most this many events per second"
            )
    stats = sub.add_parser("stats", help="counts by reason, oldest and newest")
    stats.add_argument("--json", action="store_true")


def dead_letters(args: argparse.Namespace) -> int:
    from worker.application import create_app  # noqa: PLC0415  Celery only for commands that need it
    from worker.producer_app import adopt_broker_topology  # noqa: PLC0415

    app = create_app(Settings.from_env())
    try:
        if args.action == "replay":  # republished to the work queues as the broker holds them
            adopt_broker_topology(app, app.settings.broker_kind)
        return ACTIONS[args.action](app, args)
    finally:
        app.close()


def _list(app: Celery, args: argparse.Namespace) -> int:
    entries = [e for e in deadletter.browse(app) if matches(e, args.reason, args.since)]
    print_entries(entries[: args.limit], as_json=args.json)
    return 0


def _show(app: Celery, args: argparse.Namespace) -> int:
    found = [e for e in deadletter.browse(app) if args.id in (e.id, e.event_id)]
    if not found:
        print(f"no entry {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(found[0].to_dict(), indent=2, ensure_ascii=False))
    return 0


def _stats(app: Celery, args: argparse.Namespace) -> int:
    print_stats(deadletter.browse(app), as_json=args.json)
    return 0


def _change(app: Celery, args: argparse.Namespace) -> int:
    """replay or purge: both change the queue, so both ask first on a terminal."""
    select = selector(args)
    if args.action == "replay" and args.dry_run:
        would = deadletter.replay(app, select, dry_run=True, store=_store(app))
        print(f"would replay {len(would)} entries")
        _print_skipped(would, "would skip")
        return 0
    chosen = [e for e in deadletter.browse(app) if select(e)]
    if not chosen:
        print("nothing selected")
        return 0
    if not confirm(f"{args.action} {len(chosen)} entries?", args.yes):
        print("aborted: nothing changed", file=sys.stderr)
        return 1
    if args.action == "purge":
        print(f"purge: {len(deadletter.purge(app, select))} entries")
        return 0
    done = deadletter.replay(app, select, store=_store(app), rate=args.rate)
    print(f"replay: {len(done)} entries")
    _print_skipped(done, "skipped")
    return 0


def _store(app: Celery) -> StateStore | None:
    """The app's state store when duplicate suppression is on (``create_app`` made it)."""
    holder = getattr(app, "state_store", None)
    settings = getattr(app, "settings", None)
    if holder is None or (isinstance(settings, Settings) and not settings.dedup_on):
        return None
    store: StateStore = holder.get()
    return store


def _print_skipped(done: deadletter.Replayed, verb: str) -> None:
    if not done.checked:
        print("state store unreachable: nothing skipped, every entry replayed as it is")
    elif done.skipped:
        print(f"{verb} {len(done.skipped)} entries already delivered (not replayed, removed)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


ACTIONS: dict[str, Callable[[Celery, argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "stats": _stats,
    "replay": _change,
    "purge": _change,
}


def selector(args: argparse.Namespace) -> Callable[[Envelope], bool]:
    if args.all:
        return lambda _: True
    if args.id:
        return lambda e: args.id in (e.id, e.event_id)
    return lambda e: reason_matches(e.reason, args.reason)


def reason_matches(reason: str, wanted: str | None) -> bool:
    if wanted is None:
        return True
    return reason == wanted or (":" not in wanted and reason.startswith(wanted + ":"))


def matches(envelope: Envelope, reason: str | None, since: str | None) -> bool:
    if not reason_matches(envelope.reason, reason):
        return False
    if since is None:
        return True
    return datetime.fromisoformat(envelope.dead_lettered_at) >= parse_since(since)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    relative = _RELATIVE_RE.match(text)
    if relative:
        amount = timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
        return (now or datetime.now(UTC)) - amount
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--since: expected an ISO time or 30m/2h/1d, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print(
            "refusing to change the queue without --yes (stdin is not a terminal)", file=sys.stderr
        )
        return False
    return input(f"{question} [y/N] ").strip().lower() in {"y", "yes"}


def print_entries(entries: list[Envelope], as_json: bool) -> None:
    if as_json:
        print(json.dumps([e.to_dict() for e in entries], ensure_ascii=False))
        return
    header = ("ID", "EVENT ID", "TASK", "REASON", "ATTEMPTS", "DEAD-LETTERED AT")
    rows = [header] + [
        (e.id[:12], e.event_id or "-", e.task or "-", e.reason, str(e.attempts), e.dead_lettered_at)
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"{len(entries)} entries")


def print_stats(entries: list[Envelope], as_json: bool) -> None:
    counts = Counter(e.reason for e in entries)
    times = sorted(e.dead_lettered_at for e in entries)
    summary = {
        "total": len(entries),
        "by_reason": dict(counts.most_common()),
        "oldest": times[0] if times else None,
        "newest": times[-1] if times else None,
    }
    if as_json:
        print(json.dumps(summary))
        return
    print(f"{summary['total']} entries; oldest {summary['oldest']}; newest {summary['newest']}")
    for reason, count in counts.most_common():
        print(f"  {count:6d}  {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
