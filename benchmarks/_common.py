"""Shared bits of the benchmark scripts: a results table and a JSON record with the machine it ran on."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekd.envinfo import environment

RESULTS = Path(__file__).parent / "results"


def show(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=150).print(table)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # the command that measured it, so that every number in results/ can be made again
    # with the environment that chose its data (EDGEKD_DATA: where Fashion-MNIST's files are)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("EDGEKD_DATA",) if os.environ.get(k)]
    command = " ".join([*env, "python", *(shlex.quote(a) for a in sys.argv)])
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
              "environment": environment(), **payload}
    device = payload.get("device", "cpu").replace(":", "")
    path = RESULTS / f"{name}-{device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
