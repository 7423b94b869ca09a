"""Preference pairs: one JSON object per line with non-empty ``prompt``, ``chosen`` and ``rejected`` strings.

The file is checked whole before any model is loaded, so a bad line stops training before the first
step with its line number and the problem (not a stack trace from inside a data collator later).
Extra keys (``rule``, ``scores``, ...) are kept and ignored by training. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicymixError

FIELDS = ("prompt", "chosen", "rejected")
MAX_REPORTED = 10  # problems listed in one error; the count says how many there were


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line number in the file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class PairsError(PolicymixError):
    """A pairs file that cannot be trained on; ``problems`` lists each bad line."""

    def __init__(self, path: str | Path, problems: list[Problem]):
        shown = "\n  ".join(str(p) for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        super().__init__(f"{path}: {len(problems)} bad line(s):\n  {shown}{more}", param="pairs")
        self.path = str(path)
        self.problems = problems


def _check_record(obj: object) -> str | None:
    """The problem with one parsed line, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in FIELDS:
        if key not in obj:
            return f"missing field {key!r}"
        value = obj[key]
        if not isinstance(value, str):
            return f"field {key!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"field {key!r} is empty"
    if obj["chosen"] == obj["rejected"]:
        return "'chosen' and 'rejected' are identical (the pair carries no preference)"
    return None


def load_pairs(path: str | Path) -> list[dict]:
    """Every record of ``path``; raises :class:`PairsError` listing every bad line (none is trained on)."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(path, [Problem(0, "file not found")])
    records: list[dict] = []
    problems: list[Problem] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(number, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(Problem(number, f"invalid JSON ({err.msg} at column {err.colno})"))
            continue
        problem = _check_record(obj)
        if problem:
            problems.append(Problem(number, problem))
        else:
            records.append(obj)
    if not problems and not records:
        problems.append(Problem(0, "no pairs in the file"))
    if problems:
        raise PairsError(path, problems)
    return records


def write_pairs(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL (UTF-8, one object a line, non-ASCII kept readable)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
