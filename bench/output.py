"""Writing a benchmark's result: one helper for the race and the other benches.

``write_results(result, stem, markdown=..., plot=...)`` writes ``stem.json`` (the result,
NaN/inf as null so that it is standard JSON), ``stem.md`` (``markdown(result)``, or the
given text) and, when ``plot`` is given, ``stem.png`` (``plot(result, path)``). Parent
folders are created; every file is written whole (no half-written JSON when a plot fails:
the JSON and markdown go first).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

#: Where the benchmarks' results are committed (bench/results/).
RESULTS = Path(__file__).resolve().parent / "results"


def finite_or_none(obj):
    """``obj`` with NaN/inf floats as None, recursively through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_results(result: dict, stem: Union[str, Path], *,
                  markdown: Union[str, Callable[[dict], str], None] = None,
                  plot: Optional[Callable[[dict, Path], None]] = None, indent: int = 1) -> list:
    """Write ``stem``.json, ``.md`` (when ``markdown`` is given: text or a function of the
    result) and ``.png`` (when ``plot`` is given). Returns the paths written."""
    stem = Path(stem)
    if stem.suffix in (".json", ".md", ".png"):
        raise ValueError(f"write_results: give the stem without a suffix, got {stem}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".json")]
    written[0].write_text(json.dumps(finite_or_none(result), indent=indent) + "\n")
    if markdown is not None:
        text = markdown(result) if callable(markdown) else markdown
        written.append(stem.with_suffix(".md"))
        written[-1].write_text(text.rstrip("\n") + "\n")
    if plot is not None:
        written.append(stem.with_suffix(".png"))
        plot(result, written[-1])
    return written
