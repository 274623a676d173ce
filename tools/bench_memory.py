"""Model memory side by side: the original, revpass exact, reversible, recompute, planner "min"
(with reversible sites allowed, and with mode="exact": the original function kept), and
SpikingJelly's memopt (optimize_memory, level 1 on the CPU; the levels given on CUDA), on the
SpikingJelly zoo's spiking_resnet18, spiking_vgg11_bn and spiking_vgg16_bn (up to T = 16) and the
snnTorch convolutional tutorial network, at several T, in one run.

    .venv/bin/python tools/bench_memory.py [--T 4 8 16 32] [--batch 4] [--batches 8 16] [--repeat 3] [--quick]
    .venv/bin/python tools/bench_memory.py --device cuda --batch 32 --T 4 --memopt 1 2
    .venv/bin/python tools/bench_memory.py --render bench_out/bench_memory.json   # tables and plot again

For each model, T and variant: bytes kept for backward at the end of the forward
(revpass.memory.saved_bytes over the whole model), the measured peak of a training step
(MemTracker on the CPU: its peak minus parameters, gradients, buffers and optimizer state, i.e.
activations plus temporaries, so that recompute buffers count; on CUDA torch.cuda's peak less
what existed before the step and the parameters' gradients), and the training-step time.
Besides every T at --batch, the models of --batch-models run at the first T with each of
--batches: the saving should hold or grow with the batch as with T.
Writes bench_out/bench_memory.{json,md} and, with matplotlib, bench_out/bench_memory.png
(memory and step time against T, memory against the batch). Targets (issues #4 and #15) are
printed, not asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import revpass  # noqa: E402
from revpass.memory import cuda_step_peak, kept_bytes, step_peak, step_time  # noqa: E402
from revpass.state import reset_states  # noqa: E402

VARIANTS = ("original", "exact", "reversible", "recompute", "planner-min", "exact-min", "memopt-L1", "memopt-L2",
            "memopt-L3", "memopt-L4")


#: the largest T a model runs at by default (spiking_vgg16_bn's step at T = 32 takes seconds on a CPU)
MAX_T = {"spiking_vgg16_bn": 16}


def _models(T: int, batch: int):
    import models  # tests/models.py: the zoo and tutorial networks as the tests build them

    return {
        "spiking_resnet18": (lambda: models.sj_zoo("spiking_resnet18"), torch.randn(T, batch, 3, 32, 32)),
        "spiking_vgg11_bn": (lambda: models.sj_zoo("spiking_vgg11_bn"), torch.randn(T, batch, 3, 32, 32)),
        "spiking_vgg16_bn": (lambda: models.sj_zoo("spiking_vgg16_bn"), torch.randn(T, batch, 3, 32, 32)),
        "snntorch_conv": (lambda: models.SnnTorchConv(num_steps=T, batch_size=batch * 4),
                          torch.randn(batch * 4, 1, 28, 28) * 2),
    }


def _memopt(net: nn.Module, x: torch.Tensor, level: int = 1) -> Optional[nn.Module]:
    """SpikingJelly's memopt on its own models: level 1 checkpoints blocks; 2 to 4 (CUDA only:
    they search by measuring CUDA memory) split them in space and time and unwrap greedily."""
    try:
        from spikingjelly.activation_based.memopt.pipeline import optimize_memory
        from spikingjelly.activation_based.model import spiking_resnet, spiking_vgg
    except ImportError:
        return None
    targets = (spiking_resnet.BasicBlock, spiking_resnet.Bottleneck, nn.Sequential)
    if not isinstance(net, (spiking_resnet.SpikingResNet, spiking_vgg.SpikingVGG)):
        return None

    def example(m):
        reset_states(m)
        return m(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize_memory(net, targets, example, level=level)


def _variant(name: str, make, x) -> Optional[nn.Module]:
    net = make().to(x.device)
    if name == "original":
        return net
    if name == "exact":
        return revpass.convert(net, x, mode="exact")
    if name == "reversible":
        return revpass.convert(net, x)
    if name == "recompute":
        return revpass.convert(net, x, mode="recompute")
    if name == "planner-min":
        return revpass.convert(net, x, budget="min")
    if name == "exact-min":  # the planner among strategies that keep the original function
        return revpass.convert(net, x, mode="exact", budget="min")
    return _memopt(net, x, int(name.rsplit("L", 1)[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 16],
                    help="larger batches, at the first T, for --batch-models (none: no batch sweep)")
    ap.add_argument("--batch-models", nargs="+", default=["spiking_resnet18", "spiking_vgg11_bn"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="T=4, one model, one timed run")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--memopt", type=int, nargs="*", default=None,
                    help="SpikingJelly memopt levels to run (default: 1 on the CPU, 1 2 3 4 on CUDA)")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # MODEL:T, one row as JSON
    ap.add_argument("--render", type=Path, default=None,
                    help="write the markdown and the plot again from a bench_memory.json, without running")
    a = ap.parse_args(argv)
    if a.render:
        data = json.loads(a.render.read_text())
        md = _markdown(data["results"], _targets(data["results"], data["meta"]["batch"]), data["meta"])  # from the rows
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench_memory.md").write_text(md)
        print(md)
        _plot(data["results"], a.out / "bench_memory.png", data["meta"]["batch"])
        return 0
    if a.memopt is None:
        a.memopt = [1, 2, 3, 4] if a.device == "cuda" else [1]
    if a.device == "cpu" and any(level > 1 for level in a.memopt):
        ap.error("memopt levels 2 to 4 search by measuring CUDA memory: --device cuda")
    if a.job:
        mname, T, batch = a.job.split(":")
        print(json.dumps(_row(mname, int(T), int(batch), a.repeat, a.device, a.memopt)))
        return 0
    if a.quick:
        a.T, a.repeat, a.models, a.batches = [4], 1, a.models or ["spiking_resnet18"], []
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    results: List[Dict[str, Any]] = []
    jobs = [(m, T, a.batch) for T in a.T for m in _models(T, a.batch) if (a.models is None or m in a.models)
            and T <= MAX_T.get(m, T)]
    jobs += [(m, min(a.T), b) for b in a.batches if b != a.batch for m in a.batch_models
             if (a.models is None or m in a.models) and m in _models(min(a.T), b)]
    for i, (mname, T, batch) in enumerate(jobs, 1):
        # each model, T and batch in a process of its own: memory the allocator keeps from one row
        # does not pile up into the next (spiking_vgg11_bn at T=32 would not fit in 24 GiB otherwise)
        proc = subprocess.run([sys.executable, __file__, "--job", f"{mname}:{T}:{batch}",
                               "--repeat", str(a.repeat), "--device", a.device,
                               "--memopt", *map(str, a.memopt)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[{i}/{len(jobs)}] {mname} T={T} batch {batch}: FAILED (exit {proc.returncode}): "
                  f"{proc.stderr.strip().splitlines()[-1:] or 'killed'}", file=sys.stderr, flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        o = row["variants"]["original"]
        print(f"[{i}/{len(jobs)}] {mname} T={T} batch {batch}: peak original {o['peak_bytes'] / 2**20:.2f} MiB, "
              + ", ".join(f"{v} {o['peak_bytes'] / d['peak_bytes']:.2f}x" for v, d in row["variants"].items()
                          if v != "original"), file=sys.stderr, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    targets = _targets(results, a.batch)
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch": a.batch,
            "repeat": a.repeat, "device": a.device,
            "device_name": torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU",
            "memopt_levels": a.memopt}
    (a.out / "bench_memory.json").write_text(json.dumps({"meta": meta, "results": results,
                                                         "targets": targets}, indent=2))
    md = _markdown(results, targets, meta)
    (a.out / "bench_memory.md").write_text(md)
    print(md)
    _plot(results, a.out / "bench_memory.png", a.batch)
    return 0 if results else 1


def _row(mname: str, T: int, batch: int, repeat: int, device: str = "cpu", memopt=(1,)) -> Dict[str, Any]:
    torch.manual_seed(0)
    make, x = _models(T, batch)[mname]
    x = x.to(device)
    peak = cuda_step_peak if device == "cuda" else step_peak
    row: Dict[str, Any] = {"model": mname, "T": T, "batch": batch, "input": list(x.shape), "device": device,
                           "variants": {}}
    for v in VARIANTS:
        if v.startswith("memopt") and int(v.rsplit("L", 1)[1]) not in memopt:
            continue
        model = _variant(v, make, x)
        if model is None:
            continue
        row["variants"][v] = {"kept_bytes": kept_bytes(model, x), "peak_bytes": peak(model, x),
                              "step_s": step_time(model, x, repeat=repeat)}
        del model
        gc.collect()  # graph modules hold reference cycles; free each variant before the next
    return row


def _batch(r: Dict[str, Any], default: int) -> int:
    return r.get("batch", default)  # rows of runs before the batch sweep: all at the run's batch


def _sweep_T(results, batch: int) -> Optional[int]:
    """The T the batch sweep ran at (None: no sweep)."""
    return min((r["T"] for r in results if _batch(r, batch) != batch), default=None)


def _series(results, model: str, along: str, batch: int) -> List[tuple]:
    """``model``'s rows along ``along`` ("T": at ``batch``; "batch": at the sweep's T), as
    (T or batch, row), in order."""
    if along == "T":
        return sorted(((r["T"], r) for r in results if r["model"] == model and _batch(r, batch) == batch),
                      key=lambda p: p[0])
    T0 = _sweep_T(results, batch)
    return sorted(((_batch(r, batch), r) for r in results if r["model"] == model and r["T"] == T0),
                  key=lambda p: p[0])


def _scaling(results, batch: int, variant: str = "exact-min") -> List[Dict[str, Any]]:
    """Whether the variant's peak ratio holds or grows with T (at ``batch``) and with the batch
    (at the smallest T of the sweep), per model: each ratio at least 95% of the one before."""
    out = []
    for m in sorted({r["model"] for r in results}):
        for along, name in (("T", "T"), ("batch", "the batch")):
            pts = [(x, r["variants"]["original"]["peak_bytes"] / r["variants"][variant]["peak_bytes"])
                   for x, r in _series(results, m, along, batch) if variant in r["variants"]]
            if len(pts) < 2:
                continue
            worst = min(b / a for (_, a), (_, b) in zip(pts, pts[1:]))
            at = f" (T = {_sweep_T(results, batch)})" if along == "batch" else f" (batch {batch})"
            out.append({"target": f"{m}: mode='exact', budget='min' peak ratio holds or grows with {name}{at}: "
                                  + ", ".join(f"{x}: {q:.2f}x" for x, q in pts)
                                  + "; the least step from one to the next",
                        "value": worst, "pass": worst >= 0.95})
    return out


#: the variants of revpass, the ones compared with memopt
REVPASS = ("exact", "reversible", "recompute", "planner-min", "exact-min")


def _against_memopt(results, batch: int = 4) -> List[Dict[str, Any]]:
    """Per memopt level: in how many of the rows that ran it (model, T and batch) a revpass
    variant is at least as low in measured peak at no worse step time (issue #15), and which
    variant: the lowest such one."""
    out = []
    for lv in sorted({v for r in results for v in r["variants"] if v.startswith("memopt")}):
        rows, met, missed, which = 0, 0, [], {}
        for r in results:
            v, o = r["variants"], r["variants"]["original"]
            if lv not in v:
                continue
            rows += 1

            def peak_time(name, v=v, o=o):
                return o["peak_bytes"] / v[name]["peak_bytes"], v[name]["step_s"] / o["step_s"]

            mp, mt = peak_time(lv)
            ok = [n for n in REVPASS if n in v and peak_time(n)[0] >= mp and peak_time(n)[1] <= mt]
            if ok:
                met += 1
                best = max(ok, key=lambda n: peak_time(n)[0])
                which[best] = which.get(best, 0) + 1
            else:
                missed.append(f"{r['model']} T={r['T']} batch {_batch(r, batch)}")
        out.append({"target": f"a revpass variant at least as low as memopt {lv.split('-')[1]} at no worse step "
                              f"time, in {met} of {rows} runs (the lowest such: "
                              + ", ".join(f"{n} in {k}" for n, k in sorted(which.items(), key=lambda x: -x[1]))
                              + (f"; none at {', '.join(missed)}" if missed else "") + "); the fraction",
                    "value": met / rows, "pass": met == rows})
    return out


def _targets(results, batch: int = 4) -> List[Dict[str, Any]]:
    out = _scaling(results, batch) + _against_memopt(results, batch)
    for r in results:
        if _batch(r, batch) != batch:
            continue
        if r["model"] == "spiking_vgg16_bn" and r["T"] == 4 and "exact-min" in r["variants"]:
            v, o = r["variants"], r["variants"]["original"]
            ratio = o["peak_bytes"] / v["exact-min"]["peak_bytes"]
            out.append({"target": "spiking_vgg16_bn: mode='exact', budget='min' >= 8x lower measured peak",
                        "value": ratio, "pass": ratio >= 8})
            t = v["exact-min"]["step_s"] / o["step_s"]
            out.append({"target": "spiking_vgg16_bn: mode='exact', budget='min' step time <= 1.3x the original's",
                        "value": t, "pass": t <= 1.3})
        if r["model"] != "spiking_resnet18" or r["T"] != 4:
            continue
        v = r["variants"]
        o = v["original"]

        def ratio(name, v=v, o=o):
            return o["peak_bytes"] / v[name]["peak_bytes"] if name in v else float("nan")

        out.append({"target": "reversible >= 2.5x lower measured peak", "value": ratio("reversible"),
                    "pass": ratio("reversible") >= 2.5})
        out.append({"target": "planner 'min' >= 8x lower measured peak", "value": ratio("planner-min"),
                    "pass": ratio("planner-min") >= 8})
        t = v["planner-min"]["step_s"] / o["step_s"]
        out.append({"target": "planner 'min' step time <= 1.25x the original's", "value": t, "pass": t <= 1.25})
        if "exact-min" in v:  # issue #15: the original function kept
            out.append({"target": "mode='exact', budget='min' >= 6x lower measured peak",
                        "value": ratio("exact-min"), "pass": ratio("exact-min") >= 6})
            t = v["exact-min"]["step_s"] / o["step_s"]
            out.append({"target": "mode='exact', budget='min' step time <= 1.3x the original's", "value": t,
                        "pass": t <= 1.3})
        t = v["reversible"]["step_s"] / o["step_s"]
        limit = 1.15 if r.get("device") == "cuda" else 1.25
        out.append({"target": f"reversible step time <= {limit}x the original's", "value": t, "pass": t <= limit})
        if "memopt-L1" in v:
            out.append({"target": "reversible at least as good as memopt level 1", "value": ratio("reversible")
                        / ratio("memopt-L1"), "pass": ratio("reversible") >= ratio("memopt-L1")})
    return out


def _markdown(results, targets, meta) -> str:
    cuda = meta.get("device") == "cuda"
    how = ("torch.cuda's peak less what existed before the step and the parameters' gradients" if cuda else
           "MemTracker's peak minus parameters, gradients, buffers and optimizer state")
    lines = ["# revpass model memory", "",
             f"{meta.get('device_name', 'CPU')}, torch {meta['torch']}, batch {meta['batch']}, median of "
             f"{meta['repeat']} training steps; {meta['date']}. Peak: {how}. Ratios: original / variant."
             + (f" Note: {meta['note']}." if meta.get("note") else ""), "",
             "| model | T | batch | variant | kept for backward | measured peak | step time | peak ratio "
             "| time ratio |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        o = r["variants"]["original"]
        for v, d in r["variants"].items():
            lines.append(f"| {r['model']} | {r['T']} | {_batch(r, meta['batch'])} | {v} | "
                         f"{d['kept_bytes'] / 2**20:.2f} MiB | "
                         f"{d['peak_bytes'] / 2**20:.2f} MiB | {d['step_s'] * 1e3:.0f} ms | "
                         f"{o['peak_bytes'] / d['peak_bytes']:.2f}x | {d['step_s'] / o['step_s']:.2f}x |")
    lines += ["", "## Summary: measured peak, original / variant", ""] + _summary(results, meta["batch"])
    lines += ["", f"## Targets (spiking_resnet18 and spiking_vgg16_bn at T=4 and batch {meta['batch']}, and the "
              "scaling with T and the batch; reported, not asserted)", ""]
    lines += [f"- {'PASS' if t['pass'] else 'MISS'} {t['target']}: {t['value']:.2f}" for t in targets]
    return "\n".join(lines) + "\n"


def _summary(results, batch: int = 4) -> List[str]:
    """The peak ratios as one row per model, T and batch (the table of docs/results.md)."""
    levels = sorted({v for r in results for v in r["variants"] if v.startswith("memopt")}) or ["memopt-L1"]
    lines = ["| model | T | batch | exact | reversible | recompute | planner \"min\" | exact, \"min\" | "
             + " | ".join(f"SpikingJelly memopt {lv.split('-')[1]}" for lv in levels)
             + " | step time: reversible / recompute / min / exact min |", "|---|---:|---:|---:|---:|---:|---:|---:|"
             + "---:|" * len(levels) + "---:|"]
    for r in results:  # in run order: T, then model; then the batch sweep
        v = r["variants"]
        o = v["original"]

        def peak(name, v=v, o=o):
            return f"{o['peak_bytes'] / v[name]['peak_bytes']:.2f}x" if name in v else "n/a"

        times = " / ".join(f"{v[n]['step_s'] / o['step_s']:.2f}x" if n in v else "n/a"
                           for n in ("reversible", "recompute", "planner-min", "exact-min"))
        lines.append(f"| {r['model']} | {r['T']} | {_batch(r, batch)} | {peak('exact')} | {peak('reversible')} | "
                     f"{peak('recompute')} | "
                     f"{peak('planner-min')} | {peak('exact-min')} | " + " | ".join(peak(lv) for lv in levels)
                     + f" | {times} |")
    return lines


def _plot(results, path: Path, batch: int = 4) -> None:
    """Per model, measured peak and step time against T (at ``batch``), and, where the batch was
    swept, measured peak against the batch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_memory: matplotlib not installed, no plot (pip install matplotlib)", file=sys.stderr)
        return
    models = sorted({r["model"] for r in results})
    swept = {r["model"] for r in results if _batch(r, batch) != batch}
    T0 = _sweep_T(results, batch)
    panels = [("peak_bytes", 2**-20, "measured peak, MiB (activations + temporaries)", "T"),
              ("step_s", 1e3, "training step, ms", "T")] + (
        [("peak_bytes", 2**-20, f"measured peak at T = {T0}, MiB", "batch")] if swept else [])
    fig, axes = plt.subplots(len(panels), len(models), figsize=(5 * len(models), 4 * len(panels)), squeeze=False)
    for row, (key, scale, label, along) in zip(axes, panels):
        for ax, m in zip(row, models):
            if along == "batch" and m not in swept:
                ax.axis("off")
                continue
            rows = _series(results, m, along, batch)
            for v in VARIANTS:
                pts = [(x, r["variants"][v][key] * scale) for x, r in rows if v in r["variants"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=v)
            ax.set_title(m)
            ax.set_xlabel("T (time steps)" if along == "T" else "batch (samples)")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"bench_memory: wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
