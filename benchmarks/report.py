"""Commit-ready results: a markdown table plus the same numbers as JSON, stamped with the machine."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The checkout's short commit, with ``-dirty`` when code (not results) differs from it; None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!benchmarks/results", ":!README.md"],
                               cwd=root, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info() -> dict:
    """Date, commit, CPU, core count and library versions: every committed number carries these."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):  # the VM is shared: how busy it was when the numbers were taken
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    for mod in ("torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats print with 2 decimals, missing values as '-'."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_report(stem: str | Path, title: str, meta: dict, table: str, data: dict, notes: str = "") -> tuple[Path, Path]:
    """Write ``stem.md`` (title, meta as a list, the table, notes) and ``stem.json`` (meta + data)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + ["", table, ""]
    if notes:
        md += [notes.strip(), ""]
    md_path, json_path = stem.with_suffix(".md"), stem.with_suffix(".json")
    md_path.write_text("\n".join(md))
    json_path.write_text(json.dumps({"meta": meta, **data}, indent=1) + "\n")
    return md_path, json_path
