"""How long revpass.convert takes on the SpikingJelly zoo's spiking_resnet18 (target: < 2 s on CPU).

    .venv/bin/python tools/bench_convert.py [--repeat 5] [--mode reversible]
    .venv/bin/python tools/bench_convert.py --planner [--mode exact]   # budget="min" against one mode
    .venv/bin/python tools/bench_convert.py --planner --mode exact --model spiking_vgg16_bn --batch 4 --repeat 2

Prints the median wall time of convert() (trace, detect, rewrite, lint; plus a shape pass when
--with-inputs) over --repeat runs, measured in one run, and the target verdict (reported, not
asserted). Writes bench_out/bench_convert.json. With --planner: convert(budget="min") and a
one-mode convert, both with example inputs, side by side in the same run, and their ratio
(target: <= 3x); the planner's memory of measured node workspaces is emptied before every run,
so that each is what a fresh process pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TARGET_S = 2.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", choices=("reversible", "exact"), default="reversible")
    ap.add_argument("--with-inputs", action="store_true", help="also pass example inputs (shape pass)")
    ap.add_argument("--planner", action="store_true", help='budget="min" against one mode (with inputs)')
    ap.add_argument("--model", choices=ZOO, default="spiking_resnet18", help="with --planner: the zoo network")
    ap.add_argument("--batch", type=int, default=2, help="with --planner: the example inputs' batch (T = 4, 32x32)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    a = ap.parse_args(argv)
    if a.planner:
        return _planner(a)

    import revpass
    from revpass.analysis import workspace

    net = _zoo()
    x = torch.randn(4, 2, 3, 32, 32) if a.with_inputs else None
    times = []
    for i in range(a.repeat + 1):  # the first run imports and warms up; not counted
        workspace._NODE_WORKSPACE.clear()  # measured node workspaces: what a fresh process pays
        t0 = time.perf_counter()
        conv = revpass.convert(net, x, mode=a.mode)
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
        print(f"[{i}/{a.repeat}] convert: {dt:.3f} s{' (warm-up)' if not i else ''}", file=sys.stderr)
    med = statistics.median(times)
    rep = conv.revpass_report
    result = {
        "model": "spikingjelly spiking_resnet18 (LIFNode, multi-step)",
        "mode": a.mode,
        "with_inputs": a.with_inputs,
        "sites": len(rep),
        "converted": rep.count(a.mode),
        "times_s": times,
        "median_s": med,
        "target_s": TARGET_S,
        "pass": med < TARGET_S,
        "torch": torch.__version__,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_convert.json").write_text(json.dumps(result, indent=2))
    print(f"convert(spiking_resnet18, mode={a.mode!r}{', example inputs' if a.with_inputs else ''}): "
          f"{rep.count(a.mode)}/{len(rep)} sites converted, median {med:.3f} s over {a.repeat} runs "
          f"-> {'PASS' if med < TARGET_S else 'MISS'} (target < {TARGET_S:g} s)")
    return 0


PLANNER_TARGET = 3.0
ZOO = ("spiking_resnet18", "spiking_vgg11_bn", "spiking_vgg16_bn")


def _zoo(name: str = "spiking_resnet18"):
    """A SpikingJelly zoo network with LIFNode, multi-step, seeded: tests/models.py's sj_zoo, as
    the tests and tools/bench_memory.py build it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import models

    return models.sj_zoo(name)


def _planner(a) -> int:
    import revpass
    from revpass.analysis import workspace
    net = _zoo(a.model)
    x = torch.randn(4, a.batch, 3, 32, 32)
    runs = {"one": lambda: revpass.convert(net, x, mode=a.mode),
            "min": lambda: revpass.convert(net, x, mode=a.mode, budget="min")}
    times = {k: [] for k in runs}
    for i in range(a.repeat + 1):  # interleaved; the first round warms up and is not counted
        for k, run in runs.items():
            workspace._NODE_WORKSPACE.clear()
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if i:
                times[k].append(dt)
            print(f"[{i}/{a.repeat}] {k}: {dt:.3f} s{' (warm-up)' if not i else ''}", file=sys.stderr)
    one, least = statistics.median(times["one"]), statistics.median(times["min"])
    ratio = least / one
    result = {"model": f"spikingjelly {a.model} (LIFNode, multi-step), T=4, batch {a.batch}", "mode": a.mode,
              "one_mode_s": one, "budget_min_s": least, "ratio": ratio, "target_ratio": PLANNER_TARGET,
              "pass": ratio <= PLANNER_TARGET, "times_s": times, "torch": torch.__version__}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_convert_planner.json").write_text(json.dumps(result, indent=2))
    print(f"convert({a.model}, batch {a.batch}, mode={a.mode!r}, budget='min'): median {least:.2f} s against "
          f"{one:.2f} s for one mode: {ratio:.1f}x -> {'PASS' if ratio <= PLANNER_TARGET else 'MISS'} (target <= "
          f"{PLANNER_TARGET:g}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
