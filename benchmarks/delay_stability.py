"""Why depth matters: the largest stable step of momentum SGD on a quadratic when the gradient is D steps old.

``f(w) = lambda w^2 / 2``; momentum SGD ``v <- mu v + g``, ``w <- w - eta v`` with ``g = lambda w_hat`` computed at
``w_hat`` read ``D`` steps earlier: ``plain`` (``w_hat`` = the parameters read), or a look-ahead from what the reader
knew, ``w_hat = w_read + c u_read`` with ``u`` the last step: ``linear`` (``c = D``), ``msnag``
(``c = sum_{i<=D} mu^i``), ``dana`` (``c = mu``). Prints, per rule and delay, the largest ``h = eta * lambda`` (on a
grid of ``--points`` values up to 4) for which ``w`` decays from 1 within ``--steps`` steps, and writes
``benchmarks/out/delay_stability.png``. Synchronous momentum SGD (``D = 0``) is stable up to ``h = 2 (1 + mu)``.

    python benchmarks/delay_stability.py        # momentum 0.9, D = 0, 1, 2, 4 (seconds)
"""

from __future__ import annotations

import argparse
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

RULES = ("plain", "dana", "msnag", "linear")


def stable(rule: str, h: float, delay: int, mu: float, steps: int) -> bool:
    ws, us, w, v = [1.0], [0.0], 1.0, 0.0
    for _ in range(steps):
        r = max(0, len(ws) - 1 - delay)
        c = {"plain": 0.0, "dana": mu, "msnag": mu * (1 - mu**delay) / (1 - mu), "linear": float(delay)}[rule]
        v = mu * v + h * (ws[r] + c * us[r])  # eta folded into h
        u = -v
        w += u
        ws.append(w)
        us.append(u)
        if abs(w) > 1e6:
            return False
    return abs(w) < 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--points", type=int, default=800)
    args = p.parse_args()
    grid = [4.0 * (i + 1) / args.points for i in range(args.points)]
    print(f"largest stable eta * lambda, momentum {args.momentum}\n")
    print("| rule | " + " | ".join(f"D = {d}" for d in args.delays) + " |")
    print("|---|" + "---:|" * len(args.delays))
    table = {}
    for rule in RULES:
        best = [max([h for h in grid if stable(rule, h, d, args.momentum, args.steps)], default=0.0) for d in args.delays]
        table[rule] = best
        print(f"| {rule} | " + " | ".join(f"{b:.3f}" for b in best) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, best in table.items():
        ax.plot(args.delays, best, marker="o", label=rule)
    ax.set_yscale("log")
    ax.set_xlabel("delay D (steps)")
    ax.set_ylabel("largest stable eta * lambda")
    ax.set_title(f"momentum {args.momentum}: delayed gradients on a quadratic")
    ax.legend()
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    png = os.path.join(OUT, "delay_stability.png")
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
