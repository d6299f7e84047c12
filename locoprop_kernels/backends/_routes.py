"""Which of the triton backend's two routes computes a Linear layer's matched-loss gradient.

The two routes compute the same function (docs/design.md section 2) at the same precision:

    "fused"  stage 1 (X W^T + b with the epilogue f(Z) - Y) and stage 2 (D^T X + bias sum +
             prox) as our two fused Triton GEMM kernels (triton_kernels/matched_loss_grad.py)
    "gemm"   Z = X W^T by torch.mm (cuBLAS on the GPU), D = f(Z + b) - Y in place by our row
             epilogue, G = D^T X by torch.mm, then scale, bias sum and prox by our finish pass
             (triton_kernels/conv_matched_loss_grad.py): the cpp CUDA backend's shape

Both have the delta form of stage 1 (``anchor_preact`` Z0 given: Z = Z0 + X (W - W0)^T +
(b - b0), only the update on low-precision operands), a key of its own (``anchored``).

Neither wins everywhere: cuBLAS is hard to beat on large square GEMMs, the fused kernels save
Z's round trip through memory and a launch on small ones. So the route is chosen per key,

    RouteKey = (B, d_in, d_out, activation kind, x dtype, weight dtype, precision, prox, device,
                anchored)

once per process, by measurement (``RouteChooser``):

- On CUDA the first call of a key times both routes on that call's own inputs and outputs
  (``cuda_event_timer``: WARMUP_CALLS untimed calls of each, then TIMED_ROUNDS interleaved
  rounds of one call of each between CUDA events, the median per route), keeps the faster and
  writes the call's result with it. Cost: (WARMUP_CALLS + TIMED_ROUNDS) calls of each route
  plus the winner's, i.e. 15 calls of the op, once per key. Later calls of the key read the
  cache. A first call inside CUDA graph capture is not timed (nothing may synchronise there):
  it runs "fused" and the key stays undecided.
- Elsewhere (the CPU, where Triton runs under its interpreter) a time says nothing about a
  GPU: the route is "fused", recorded as not timed.
- A registered activation (its ``triton_f`` runs only in the fused kernel) has one route.

Overrides, strongest first: ``set_route(route)`` / ``using_route(route)``, then the
environment variable ``LOCOPROP_LINEAR_ROUTE``; values "fused", "gemm" or "auto" (measure).
A forced route is not recorded as a decision. The decisions are visible: ``routes()`` returns
one ``RouteDecision`` per decided key (both times in ms when timed, the winner, how it was
decided), ``routes_report()`` renders them as a table. Per-op calls only: the grouped kernels
(``grouped_matched_loss_grad``, all layers in one launch) have one route.
"""
from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch

ROUTES = ("fused", "gemm")
#: What ``set_route`` and the environment variable accept; "auto" measures.
CHOICES = ROUTES + ("auto",)
ENV = "LOCOPROP_LINEAR_ROUTE"
#: Untimed calls of each route before timing: JIT compilation, cuBLAS handle and workspace
#: creation and the allocator's first blocks stay out of the numbers.
WARMUP_CALLS = 2
#: Interleaved timed rounds (one call of each route per round): the median of 5 shrugs off
#: one disturbed round while keeping the one-time cost small.
TIMED_ROUNDS = 5

#: A timer: {route: a call of it} -> {route: its time in ms}. The calls write the op's outputs
#: and may run any number of times.
Timer = Callable[[Mapping[str, Callable[[], None]]], Dict[str, float]]


@dataclass(frozen=True)
class RouteKey:
    """What a route decision depends on (module docstring)."""

    batch: int
    d_in: int
    d_out: int
    #: "softmax" (a row needs all of d_out), "elementwise", or "registered <name>".
    activation: str
    x_dtype: str
    weight_dtype: str
    precision: str
    prox: bool
    device: str
    #: Stage 1 in the delta form (``anchor_preact`` given): one more GEMM operand to load.
    anchored: bool = False

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, activation: str, precision: str,
           prox: bool, anchored: bool = False) -> "RouteKey":
        """The key of a call on x (B, d_in) and weight (d_out, d_in)."""
        def name(dtype):
            return str(dtype).replace("torch.", "")
        return cls(x.shape[0], x.shape[1], weight.shape[0], activation, name(x.dtype),
                   name(weight.dtype), precision, bool(prox), str(x.device), bool(anchored))


@dataclass(frozen=True)
class RouteDecision:
    """One decided key: the route its calls take, how that was decided and, when timed, the
    median ms of each route."""

    key: RouteKey
    route: str
    #: "timed", "not timed (device cpu)", or "only route (registered activation)".
    how: str
    fused_ms: Optional[float] = None
    gemm_ms: Optional[float] = None


def cuda_event_timer(runs: Mapping[str, Callable[[], None]]) -> Dict[str, float]:
    """The median ms of each run on the current CUDA stream: WARMUP_CALLS untimed calls of
    each, then TIMED_ROUNDS rounds of one call of each between CUDA events (interleaved, so
    that a drift of the clocks touches every route alike)."""
    for run in runs.values():
        for _ in range(WARMUP_CALLS):
            run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(TIMED_ROUNDS):
        for name, run in runs.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _check_choice(route, where: str) -> Optional[str]:
    if route is not None and route not in CHOICES:
        raise ValueError(f"locoprop: {where} expected one of {list(CHOICES)}"
                         f"{' or None' if where == 'set_route' else ''}, got {route!r}")
    return route


_override: Optional[str] = None


def set_route(route: Optional[str]) -> None:
    """Force the Linear matched-loss route of the triton backend for every later call:
    "fused", "gemm", "auto" (measure, even if the environment variable forces one), or None
    (no override: ``LOCOPROP_LINEAR_ROUTE``, else "auto")."""
    global _override
    _override = _check_choice(route, "set_route")


@contextlib.contextmanager
def using_route(route: Optional[str]) -> Iterator[None]:
    """``set_route(route)`` for the block, the previous override restored after it."""
    saved = _override
    set_route(route)
    try:
        yield
    finally:
        set_route(saved)


def forced_route() -> Optional[str]:
    """The route every call takes now ("fused" or "gemm"), or None when routes are chosen per
    key (``set_route``'s value, else the environment variable's, else "auto")."""
    route = _override or _check_choice(os.environ.get(ENV) or None, ENV)
    return None if route in (None, "auto") else route


class RouteChooser:
    """Chooses and remembers a route per ``RouteKey`` (module docstring). ``timer`` (a
    ``Timer``) replaces the CUDA-event timer on every device: tests drive the decision with
    a fake clock through it."""

    def __init__(self, timer: Optional[Timer] = None):
        self.timer = timer
        self._decided: Dict[RouteKey, RouteDecision] = {}

    def choose(self, x: torch.Tensor, weight: torch.Tensor, activation: str, precision: str,
               prox: bool, runs: Mapping[str, Callable[[], None]],
               anchored: bool = False) -> str:
        """The route for a call on x (B, d_in) and weight (d_out, d_in) (``RouteKey``'s other
        fields as given); ``runs`` holds a call of each route available to it (both, or
        "fused" alone), which the first call of a key may time."""
        # The cache is keyed by the raw fields (hashing torch dtypes and devices is cheap);
        # the RouteKey of names is made once per decision, for the report.
        raw = (x.shape[0], x.shape[1], weight.shape[0], activation, x.dtype, weight.dtype,
               precision, prox, x.device, anchored)
        decision = self._decided.get(raw)
        if len(runs) == 1:
            if decision is None:
                (only,) = runs
                name = activation.replace("registered ", "")
                self._decided[raw] = decision = RouteDecision(
                    RouteKey.of(x, weight, activation, precision, prox, anchored), only,
                    f"only route ({name} is a registered activation)")
            return decision.route
        forced = forced_route()
        if forced is not None:
            return forced
        if decision is None:
            decision = self._decide(RouteKey.of(x, weight, activation, precision, prox,
                                                anchored), runs, x.device)
            if decision is None:
                return "fused"
            self._decided[raw] = decision
        return decision.route

    def _decide(self, key, runs, device) -> Optional[RouteDecision]:
        timer = self.timer
        if timer is None and device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return None  # no synchronisation inside a capture: decide on an eager call
            timer = cuda_event_timer
        if timer is None:
            return RouteDecision(key, "fused", f"not timed (device {device.type})")
        ms = timer(runs)
        # Ties go to "fused": one fewer library in the call path.
        route = min(ROUTES, key=lambda r: (ms[r], r != "fused"))
        return RouteDecision(key, route, "timed", ms["fused"], ms["gemm"])

    def decisions(self) -> List[RouteDecision]:
        """Every decided key, in the order they were decided."""
        return list(self._decided.values())

    def clear(self) -> None:
        """Forget every decision: the next call of each key decides again."""
        self._decided.clear()


#: The chooser the triton backend asks (module docstring).
CHOOSER = RouteChooser()


def routes() -> List[RouteDecision]:
    """Every decided key of the triton backend's Linear matched-loss routes (``RouteDecision``
    rows: key, route, how, fused_ms, gemm_ms), in decision order."""
    return CHOOSER.decisions()


def clear_routes() -> None:
    """Forget the decided routes (they are decided again on the next call of each key)."""
    CHOOSER.clear()


def routes_report() -> str:
    """``routes()`` as a markdown table, under a line saying whether a route is forced."""
    forced = forced_route()
    by = "set_route" if _override else ENV
    lines = [f"Linear matched-loss routes of the triton backend: "
             f"{f'forced to {forced} by {by}' if forced else 'chosen per key'}", "",
             "| B | d_in | d_out | f | x | weight | precision | prox | device "
             "| fused ms | gemm ms | route | how |",
             "|---:|---:|---:|---|---|---|---|---|---|---:|---:|---|---|"]

    def ms(v):
        return "-" if v is None else f"{v:.4f}"
    for d in routes():
        k = d.key
        f = f"{k.activation}{', delta form' if k.anchored else ''}"
        lines.append(f"| {k.batch} | {k.d_in} | {k.d_out} | {f} | {k.x_dtype} "
                     f"| {k.weight_dtype} | {k.precision} | {'yes' if k.prox else 'no'} "
                     f"| {k.device} | {ms(d.fused_ms)} | {ms(d.gemm_ms)} | {d.route} "
                     f"| {d.how} |")
    if not routes():
        lines.append("| (no key decided yet) |||||||||||||")
    return "\n".join(lines) + "\n"
