"""The race's tables and figure: ``table`` (a race), ``tune_table`` (a tuning run), ``plot``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable


def _cell(values: list, fmt: Callable) -> str:
    """One table cell from the runs' values: 'v', or 'v1 / v2' (the spread), '–' for None."""
    shown = [("–" if v is None else fmt(v)) for v in values]
    return " / ".join(shown) if len(set(shown)) > 1 else shown[0]


def _loss(v: float) -> str:
    """A loss cell: 56.6 (the autoencoder's BCE), 0.312 (cross-entropies)."""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def focus_targets(targets: list) -> list:
    """The two targets the summary lines compare at: the second and third lowest (on the
    autoencoder: 70 and 65), all of them when there are fewer than three."""
    keys = [f"{t:g}" for t in sorted(targets, reverse=True)]
    return keys[-3:-1] if len(keys) >= 3 else keys


def _mb(n) -> str:
    return f"{n / 2 ** 20:.1f}"


def table(result: dict) -> str:
    """The markdown table: per entry (across runs, 'run 1 / run 2'), seconds of its own
    training to each target, final loss, steps, s/step, state MB, RSS peak MB (isolated: one
    measurement in a fresh process, shared by the runs; in-process: one per race), status."""
    cfg = result["config"]
    runs = result["runs"]
    targets = [f"{t:g}" for t in cfg["targets"]]
    ids = list(dict.fromkeys(e["id"] for run in runs for e in run["entries"]))
    by_id = {i: [next((e for e in run["entries"] if e["id"] == i), None) for run in runs]
             for i in ids}
    lines = [
        f"Race, task {cfg['task']} ({cfg['task_description']}), on {result['machine']} "
        f"({result['device']}, {cfg['dtype']}, torch "
        f"{result['torch']}{', ' + str(cfg['threads']) + ' threads' if cfg['threads'] else ''}):"
        f" {cfg['budget']:g} s of training per optimizer, interleaved in "
        f"{cfg['slice_seconds']:g} s slices; {cfg['dataset']} {cfg['train_size']} training "
        f"rows, batch {cfg['batch']}; loss = {cfg['loss']}, on the first "
        f"{cfg['eval_size']} training rows (evaluated every {cfg['eval_every']} steps or "
        f"{cfg['eval_seconds']:g} s, off the clock). Seconds are each optimizer's own "
        f"training time to reach the loss. "
        + (f"{len(runs)} races: cells show 'race 1 / race 2 / ...' where they differ."
           if len(runs) > 1 else "One race."),
        "",
        "| optimizer | setting | " + " | ".join(f"s to {t}" for t in targets)
        + " | final loss | steps | s/step | state MB | RSS peak MB isolated "
          "| RSS peak MB in-process | status |",
        "|---|---|" + "---:|" * (len(targets) + 7) + "---|",
    ]
    for i in ids:
        es = [e for e in by_id[i] if e is not None]
        cells = [_cell([e["time_to"].get(t) for e in es], lambda v: f"{v:.0f}") for t in targets]
        mem = [e["memory"] for e in es]
        state = _cell([m.get("bytes") for m in mem], _mb)
        iso = _cell([(m.get("isolated") or {}).get("rss_peak_above") for m in mem], _mb)
        inproc = _cell([(m.get("inprocess") or {}).get("rss_peak_above") for m in mem], _mb)
        status = "; ".join(dict.fromkeys(
            ("stalled" if e["stalled"] else "ok") if e["status"] == "ok" else e["status"]
            for e in es))
        lines.append(
            f"| {i} | {es[0]['setting']} | " + " | ".join(cells)
            + f" | {_cell([e['final_loss'] for e in es], _loss)}"
            + f" | {_cell([e['steps'] for e in es], str)}"
            + f" | {_cell([e['s_per_step'] for e in es], lambda v: f'{v:.3f}')}"
            + f" | {state} | {iso} | {inproc} | {status} |")
    lines += ["", *summary_lines(result)]
    return "\n".join(lines)


def summary_lines(result: dict) -> list:
    """'to 70: fastest X (95 s); Y 1.21x, ...' per focus target (``focus_targets``) and race."""
    focus = focus_targets(result["config"]["targets"])
    out = []
    many = len(result["runs"]) > 1
    for run in result["runs"]:
        entries = run["entries"]
        prefix = f"race {run.get('run', 1)}, " if many else ""
        for t in focus:
            reached = sorted((e["time_to"].get(t), e["id"]) for e in entries
                             if e["time_to"].get(t) is not None)
            if not reached:
                out.append(f"- {prefix}to {t}: nobody reached it within the budget.")
                continue
            best, who = reached[0]
            others = ", ".join(f"{i} {s / best:.2f}x" for s, i in reached[1:])
            missing = [e["id"] for e in entries if e["time_to"].get(t) is None]
            out.append(f"- {prefix}to {t}: fastest {who} ({best:.0f} s)"
                       + (f"; {others}" if others else "")
                       + (f"; not reached: {', '.join(missing)}" if missing else "") + ".")
    return out


def plot(result: dict, path: Path) -> None:
    """Loss on the evaluation subset against each optimizer's training seconds (log y); on
    a step budget (a ``--budget-steps`` tuning) against its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ids = list(dict.fromkeys(e["id"] for run in result["runs"] for e in run["entries"]))
    colors = {i: f"C{k % 10}" for k, i in enumerate(ids)}
    styles = ["-", "--", ":", "-."]
    cfg = result["config"]
    on_steps = cfg.get("budget_steps") is not None
    for n, run in enumerate(result["runs"]):
        for e in run["entries"]:
            pts = [(h[1] if on_steps else h[0], h[2]) for h in e["history"]
                   if h[2] is not None and math.isfinite(h[2]) and h[2] > 0]
            if not pts:
                continue
            flag = "" if e["status"] == "ok" and not e["stalled"] else \
                (" (stalled)" if e["stalled"] else f" ({e['status'].split()[0]})")
            ax.plot(*zip(*pts), styles[n % len(styles)], color=colors[e["id"]],
                    lw=1.6 if n == 0 else 1.0, label=(e["id"] + flag) if n == 0 else None)
    for t in result["config"]["targets"]:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("training steps" if on_steps else
                  "training seconds (each optimizer's own steps; evaluation excluded)")
    ax.set_ylabel(f"train loss ({cfg['loss']}),\nfirst {cfg['eval_size']} rows", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    runs = len(result["runs"])
    ax.set_title(f"Race, task {cfg['task']}, {budget_text(cfg)} each, "
                 f"{result['machine']}" + (f" ({runs} races: line styles)" if runs > 1 else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_text(cfg: dict) -> str:
    """'600 s' (a clock budget) or '450 steps' (a step budget: ``--budget-steps``)."""
    if cfg.get("budget_steps") is not None:
        return f"{cfg['budget_steps']} steps"
    return f"{cfg['budget']:g} s"


def tune_table(result: dict) -> str:
    """The markdown table of a tuning run: every trial of every entry, the best marked. On a
    step budget the target columns are steps (the seconds are a loaded machine's)."""
    cfg = result["config"]
    targets = [f"{t:g}" for t in cfg["targets"]]
    on_steps = cfg.get("budget_steps") is not None
    unit, key = ("steps", "steps_to") if on_steps else ("s", "time_to")
    lines = [f"Tuning races, task {cfg['task']}, on {result['machine']} ({result['device']}): "
             f"{budget_text(cfg)} of training per setting, {cfg['trials']} settings per "
             f"optimizer (a seeded sample of its grid), interleaved; best = lowest final loss "
             f"(marked *).", "",
             "| optimizer | setting | " + " | ".join(f"{unit} to {t}" for t in targets)
             + " | final loss | s/step | status |",
             "|---|---|" + "---:|" * (len(targets) + 2) + "---|"]
    for i, trials in result["trials"].items():
        best = result["best"].get(i, {}).get("setting")
        for e in trials:
            mark = " *" if e["setting"] == best else ""
            status = ("stalled" if e["stalled"] else "ok") if e["status"] == "ok" \
                else e["status"]
            lines.append(f"| {i} | {e['setting']}{mark} | "
                         + " | ".join("–" if e[key][t] is None else
                                      f"{e[key][t]:.0f}" for t in targets)
                         + f" | {_cell([e['final_loss']], _loss)} | "
                         + ("–" if e["s_per_step"] is None else f"{e['s_per_step']:.3f}")
                         + f" | {status} |")
    return "\n".join(lines)
