"""Which entries race with which settings: the command line's ``entry.key=value`` lists, a
tuning file, and ``peers.ENTRIES``' defaults, resolved into one spec per entry."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from . import peers


def parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'none' -> None, 'true' -> True, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[+-]?\d+", low):
        return int(low)
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_assignments(text: Optional[str], *, default_key: Optional[str] = None,
                      lists: bool = False) -> dict:
    """'kfac.damping=1,adam.lr=1e-3' -> {'kfac': {'damping': 1, 'lr': 0.001}}; with
    ``default_key`` a bare 'adam=1e-3' sets that key; with ``lists`` 'a.b=1:2' -> [1, 2]."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        target, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"race: expected entry.key=value, got {item!r}")
        entry, dot, key = target.strip().partition(".")
        if not dot:
            if default_key is None:
                raise SystemExit(f"race: expected entry.key=value, got {item!r}")
            key = default_key
        values = [parse_value(v) for v in value.split(":")] if lists else parse_value(value)
        out.setdefault(entry, {})[key] = values
    return out


def select(task: str, text: str) -> list:
    """The entry ids of ``--optimizers`` ('all' or a comma-separated list) on ``task``."""
    entries = peers.ENTRIES[task]
    ids = list(entries) if text == "all" else [i.strip() for i in text.split(",") if i.strip()]
    unknown = [i for i in ids if i not in entries]
    if unknown:
        raise SystemExit(f"race: unknown entries {unknown} for task {task}; choose from "
                         f"{list(entries)}")
    return ids


def resolve(task: str, ids: list, settings_file: Optional[str], overrides: dict) -> dict:
    """id -> dict(peer, lr, hparams, note, source): ``ENTRIES[task]``, then the tuned
    settings files (comma-separated; a later file's entry replaces an earlier one's), then
    the command line's overrides (``{'adam': {'lr': 1e-3}}``)."""
    tuned, tuned_in = {}, {}
    for name in filter(None, (part.strip() for part in (settings_file or "").split(","))):
        path = Path(name)
        if not path.exists():
            raise SystemExit(f"race: settings file {path} not found (make it with --tune)")
        saved = json.loads(path.read_text())
        saved_task = saved.get("config", {}).get("task", "autoencoder")
        if saved_task != task:
            raise SystemExit(f"race: {path} was tuned on task {saved_task}, not {task}")
        for entry, best in saved.get("best", {}).items():
            tuned[entry], tuned_in[entry] = best, name
    specs = {}
    for i in ids:
        e = peers.ENTRIES[task][i]
        spec = dict(peer=e.peer, lr=e.lr, hparams=dict(e.hparams), note=e.note,
                    source="default")
        if i in tuned:
            spec["lr"] = tuned[i]["lr"]
            spec["hparams"] = {**spec["hparams"], **tuned[i].get("hparams", {})}
            spec["source"] = f"tuned ({tuned_in[i]})"
        for key, value in overrides.get(i, {}).items():
            if key == "lr":
                spec["lr"] = value
            else:
                spec["hparams"][key] = value
        if overrides.get(i):
            spec["source"] += " + command line"
        specs[i] = spec
    return specs
