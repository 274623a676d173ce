"""What a lower peak costs in time: revpass.Peak budgets with the original function kept, on the CPU.

    python tools/bench_budget.py [--models spiking_resnet18 spiking_vgg16_bn] [--T 4] [--batch 4]
                                 [--fractions 2 3 4 5 6] [--repeat 15] [--out bench_out]

For each model (SpikingJelly zoo, 32x32): the original, ``mode="exact"``, ``mode="exact"`` under
``revpass.Peak(P / k)`` for each k of --fractions (P: the original's measured peak), and
``mode="exact", budget="min"``: the estimated and measured peak of a training step
(revpass.memory.step_peak: activations and temporaries) and its time (the median of --repeat
steps after a warm-up, the variants interleaved step by step, so that the machine's drift falls
on all of them alike), each against the original's. A budget the planner cannot meet is a row
that says so (revpass.BudgetError names the smallest reachable peak).

Writes OUT/bench_budget_cpu.{md,json} and, with matplotlib, OUT/bench_budget_cpu.png: per model,
measured peak against step time, a point per variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]

import revpass  # noqa: E402
from bench_train import _interleaved, _step_s  # noqa: E402  (the first step of each variant warms up)
from revpass.memory import step_peak  # noqa: E402
from revpass.planning.peak import estimate_peak  # noqa: E402


def _rows(name: str, T: int, batch: int, fractions: List[int], repeat: int) -> List[Dict[str, Any]]:
    import models  # tests/models.py: the zoo networks as the tests build them

    torch.manual_seed(0)
    net, x = models.sj_zoo(name), torch.randn(T, batch, 3, 32, 32)
    original = step_peak(net, x)
    variants: Dict[str, Dict[str, Any]] = {"original": {"model": net, "budget": None, "peak_bytes": original}}
    asks = [("exact", None)] + [(f"exact, Peak(P/{k})", revpass.Peak(original // k)) for k in fractions] + [
        ("exact, min", "min")]
    for label, budget in asks:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            gm = revpass.convert(net, x, mode="exact", **({} if budget is None else {"budget": budget}))
        except revpass.BudgetError as e:
            variants[label] = {"model": None, "budget": repr(budget), "error": str(e)}
            print(f"{name} {label}: {e}", file=sys.stderr, flush=True)
            continue
        variants[label] = {"model": gm, "budget": repr(budget), "convert_s": time.perf_counter() - t0,
                           "estimated_bytes": estimate_peak(gm), "peak_bytes": step_peak(gm, x)}
        print(f"{name} {label}: converted in {variants[label]['convert_s']:.1f} s, measured peak "
              f"{variants[label]['peak_bytes'] / 2**20:.2f} MiB", file=sys.stderr, flush=True)
    times = _interleaved({k: v["model"] for k, v in variants.items() if v["model"] is not None}, x, _step_s, repeat)
    rows = []
    for k, v in variants.items():
        row = {"model": name, "T": T, "batch": batch, "variant": k,
               **{f: v[f] for f in ("budget", "error", "convert_s", "estimated_bytes", "peak_bytes") if f in v}}
        if k in times:
            row["step_s"] = times[k]
        rows.append(row)
    for v in variants.values():
        v.pop("model", None)
    gc.collect()
    return rows


def _markdown(rows: List[Dict[str, Any]], argv: List[str]) -> str:
    lines = [f"# Memory against time under revpass.Peak budgets (CPU, torch {torch.__version__})", "",
             f"`python tools/bench_budget.py {' '.join(argv)}`".replace(" `", "`"), "",
             "P: the original's measured peak; the budget is on the estimated peak. Ratios: original / variant "
             "(peak), variant / original (step time), the variants' steps interleaved in one run.", "",
             "| model | T | batch | variant | estimated peak | measured peak | peak ratio | step time | time ratio |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(o for o in rows if o["model"] == r["model"] and o["variant"] == "original")
        if "error" in r:
            least = re.search(r"\(([\d.]+) MiB", r["error"])
            lines.append(f"| {r['model']} | {r['T']} | {r['batch']} | {r['variant']} | cannot be met (the lowest "
                         f"reachable: {least.group(1) if least else '?'} MiB) | | | | |")
            continue
        est = f"{r['estimated_bytes'] / 2**20:.2f} MiB" if "estimated_bytes" in r else ""
        lines.append(f"| {r['model']} | {r['T']} | {r['batch']} | {r['variant']} | {est} | "
                     f"{r['peak_bytes'] / 2**20:.2f} MiB | {base['peak_bytes'] / r['peak_bytes']:.2f}x | "
                     f"{1e3 * r['step_s']:.0f} ms | {r['step_s'] / base['step_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def _plot(rows: List[Dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("bench_budget: matplotlib not installed, no plot (pip install matplotlib)", file=sys.stderr)
        return
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [r for r in rows if r["model"] == name and "step_s" in r]
        ax.plot([1e3 * r["step_s"] for r in pts], [r["peak_bytes"] / 2**20 for r in pts], marker="o")
        for r in pts:
            ax.annotate(r["variant"], (1e3 * r["step_s"], r["peak_bytes"] / 2**20), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_title(f"{name} (T = {pts[0]['T']}, batch {pts[0]['batch']})")
        ax.set_xlabel("training step, ms")
        ax.set_ylabel("measured peak, MiB (activations + temporaries)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"bench_budget: wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["spiking_resnet18", "spiking_vgg16_bn"])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--fractions", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    a = ap.parse_args(argv)
    rows = [r for name in a.models for r in _rows(name, a.T, a.batch, a.fractions, a.repeat)]
    md = _markdown(rows, argv)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_budget_cpu.md").write_text(md)
    (a.out / "bench_budget_cpu.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, a.out / "bench_budget_cpu.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
