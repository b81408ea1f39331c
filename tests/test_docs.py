"""The README's settings and dead-letter reason tables are checked against the code, so that
they cannot drift from it again."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path

from worker.envelope import REASONS
from worker.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW_RE = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|")


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every variable asked of it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return default

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read() -> set[str]:
    env = _Recording()
    Settings.from_env(env)
    return env.asked


def section(title: str) -> list[str]:
    """The lines of the README section with this heading, up to the next heading of its level."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    level = title.split(" ", 1)[0]
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].split(" ", 1)[0] == level),
        len(lines),
    )
    return lines[start + 1 : end]


def table_rows(title: str) -> dict[str, str]:
    """First cell (in backticks) to second cell, for the first table of a section."""
    rows: dict[str, str] = {}
    in_table = False
    for line in section(title):
        match = _ROW_RE.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
            in_table = True
        elif in_table and not line.startswith("|"):
            break
    return rows


def test_the_settings_table_lists_exactly_what_settings_reads() -> None:
    """Every variable Settings.from_env reads has a row, and every row is read."""
    documented = set(table_rows("## Settings"))
    assert documented == variables_read()


def _field_for(variable: str) -> str:
    """TOTANGO_MAX_RETRIES -> max_retries; SENTRY_DSN -> sentry_dsn."""
    return variable.removeprefix("TOTANGO_").lower()


def _matches(cell: str, default: object) -> bool:
    text = cell.strip().strip("`").strip()
    if default is None:
        return text.lower() in {"", "-", "—", "unset", "none"} or text.startswith("(")
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(text.replace(",", "")) == float(default)
        except ValueError:
            return False
    return text == default


def test_the_settings_table_states_the_real_defaults() -> None:
    """The default column of each row is the default in the code."""
    defaults = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
    wrong = {
        variable: (cell, defaults[_field_for(variable)])
        for variable, cell in table_rows("## Settings").items()
        if not _matches(cell, defaults[_field_for(variable)])
    }
    assert wrong == {}


def test_the_reason_table_lists_exactly_the_reason_families_of_the_code() -> None:
    """Every reason family an envelope can carry (worker/envelope.py REASONS) has a row."""
    assert set(table_rows("## Dead letters")) == set(REASONS)
