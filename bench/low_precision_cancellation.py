"""Why a whole LocoProp step loses more to tf32/bf16 than one local gradient does.

    .venv/bin/python -m bench.low_precision_cancellation

In the inner iterations t >= 1 stage 1 computes D = f(X W_t^T + b_t) - f(Z0) with W_t = W0 + dW
and dW small (a few RMSProp steps of lr 1e-5 .. 1e-2). With the GEMM's operands rounded to
tf32 (10-bit mantissa) or bf16 (7-bit), rounding W_t moves Z by about 2^-11 or 2^-8 of |Z|,
which swamps the X dW^T the step is made of: the error of D relative to D grows like
(rounding unit) / |dW / W|. Computing the same Z as Z0 + X dW^T + db (Z0 and the sum in fp32, only
X dW^T on the low-precision operands) rounds dW relative to itself: the error stays at the
rounding unit whatever the update size. This script emulates both roundings in float64 (the
operands rounded to tf32/bf16, everything else exact) on a 256 x 32 -> 16 tanh layer and writes
the relative error of D^T X against float64 per update size.
Writes bench/results/low-precision-cancellation.json and .md.
"""
from __future__ import annotations

import torch

from bench.output import RESULTS, write_results


def round_to(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t's values rounded to the operand format of ``precision`` (round to nearest even)."""
    if precision == "bf16":
        return t.to(torch.bfloat16).to(t.dtype)
    # tf32: fp32 with the low 13 mantissa bits rounded off.
    bits = t.to(torch.float32).view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32).to(t.dtype)


def main():
    torch.manual_seed(0)
    rows, d_in, d_out = 256, 32, 16
    x = torch.randn(rows, d_in, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5
    z0 = x @ w0.T
    y = torch.tanh(z0)
    table = []
    for size in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        dw = size * w0.abs().mean() * torch.randn_like(w0)
        exact = (torch.tanh(x @ (w0 + dw).T) - y).T @ x
        row = dict(update=size)
        for precision in ("tf32", "bf16"):
            xr = round_to(x, precision)
            direct = (torch.tanh(xr @ round_to(w0 + dw, precision).T) - y).T @ x
            delta = (torch.tanh(z0 + xr @ round_to(dw, precision).T) - y).T @ x
            row[f"{precision}_direct"] = ((direct - exact).norm() / exact.norm()).item()
            row[f"{precision}_delta"] = ((delta - exact).norm() / exact.norm()).item()
        table.append(row)
    lines = ["# Low-precision stage 1: X W_t^T against Z0 + X dW^T", "",
             "Relative error of D^T X against float64, 256 x 32 -> 16 tanh layer, operands "
             "rounded to tf32/bf16 (emulated in float64); `python -m "
             "bench.low_precision_cancellation`", "",
             "| update size dW/W | tf32, X W^T | tf32, Z0 + X dW^T | bf16, X W^T | bf16, Z0 + X dW^T |",
             "|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['update']:g} | {r['tf32_direct']:.3g} | {r['tf32_delta']:.3g} | "
                     f"{r['bf16_direct']:.3g} | {r['bf16_delta']:.3g} |")
    write_results(dict(rows=rows, d_in=d_in, d_out=d_out, table=table,
                       command="python -m bench.low_precision_cancellation"),
                  RESULTS / "low-precision-cancellation", markdown="\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
