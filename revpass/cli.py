"""The ``revpass`` command: inspect, convert, verify, export and bench a model from the shell.

    revpass inspect spikingjelly.activation_based.model.spiking_resnet:spiking_resnet18 \\
        --kwargs '{"spiking_neuron": "spikingjelly.activation_based.neuron:LIFNode"}' \\
        --input-shape 4,2,3,32,32 --step-mode m

MODEL is ``package.module:factory`` or ``path/to/file.py:factory``; ``--kwargs`` is JSON whose
string values of the form ``pkg.mod:Name`` are resolved to that object. The model runs on a random
input of ``--input-shape`` (seeded). Errors print one line on stderr and exit non-zero; ``--debug``
shows the traceback.

``revpass convert MODEL -o out.pt`` saves a recipe (the factory, its arguments, the options) and
the weights; :func:`load` (``revpass load out.pt``) rebuilds from it. The recipe names code (the
factory, ``pkg.mod:Name`` arguments, a ``path/to/file.py`` that is executed): load imports and
calls none of it unless the caller passes the model or the factory, or says it trusts the file
(``trust=True``, ``--trust-file``), as ``torch.load(weights_only=False)`` does for pickles.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from revpass.errors import RevpassError

EXIT_FAIL, EXIT_USAGE = 1, 2
_OBJECT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
FORMAT = "revpass-converted-1"


class CliError(Exception):
    """A user-facing error: printed as one line."""


class UntrustedFileError(RevpassError, CliError):
    """A saved model's file names code (its factory, objects among the factory's arguments) that
    :func:`load` was not told to import and call: pass the model or the factory, or trust the file."""


# ----------------------------------------------------------------------------------------------
# loading the model
# ----------------------------------------------------------------------------------------------


def resolve(ref: str) -> Any:
    """``pkg.mod:Name`` or ``path/file.py:Name`` (dotted attributes allowed after the colon)."""
    if ":" not in ref:
        raise CliError(f"{ref!r} is not of the form package.module:factory or path/to/file.py:factory")
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise CliError(f"no such file: {where}")
        name = "revpass_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(where))[0])
        spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise CliError(f"importing {where} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise CliError(f"cannot import {where!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_kwargs(value: Any) -> Any:
    """JSON kwargs with ``pkg.mod:Name`` strings resolved, at any depth."""
    if isinstance(value, str) and _OBJECT.match(value):
        return resolve(value)
    if isinstance(value, list):
        return [resolve_kwargs(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve_kwargs(v) for k, v in value.items()}
    return value


def build(args) -> torch.nn.Module:
    factory = resolve(args.model)
    try:
        kwargs = resolve_kwargs(json.loads(args.kwargs)) if args.kwargs else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"--kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise CliError("--kwargs must be a JSON object")
    model = _instantiate(factory, kwargs, args.model, args.seed)
    _set_step_mode(model, args.step_mode, args.model)
    return model


def _instantiate(factory, kwargs: Dict[str, Any], name: str, seed: int) -> torch.nn.Module:
    """``factory(**kwargs)`` under ``seed``, checked to be a module."""
    torch.manual_seed(seed)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise CliError(f"{name}({', '.join(kwargs)}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _set_step_mode(model: torch.nn.Module, step_mode: Optional[str], name: str) -> None:
    if step_mode:
        from revpass.neurons import set_step_mode

        if not set_step_mode(model, step_mode):
            raise CliError(f"--step-mode {step_mode}: no module of {name}'s frameworks has a step mode "
                           "(SpikingJelly's modules do)")


def example_input(args) -> torch.Tensor:
    if not args.input_shape:
        raise CliError("--input-shape is required (for example --input-shape 4,2,3,32,32)")
    try:
        shape = [int(s) for s in args.input_shape.replace("x", ",").split(",") if s.strip()]
    except ValueError as exc:
        raise CliError(f"--input-shape {args.input_shape!r}: expected integers separated by commas") from exc
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(shape, generator=g) * args.input_scale + args.input_offset


def _run_checked(model, x):
    """One forward, so that a shape that does not fit fails here with the model's own words."""
    from revpass.state import reset_states

    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise CliError(f"the model does not run on an input of shape {tuple(x.shape)}: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        reset_states(model)


def _budget(text: str):
    """--budget: 'min', a number of bytes kept for backward, or 'peak:BYTES' (the estimated peak)."""
    if text == "min":
        return "min"
    if text.startswith("peak:") and text[5:].isdigit():
        from revpass.planning.budget import Peak

        return Peak(int(text[5:]))
    if text.isdigit():
        return int(text)
    raise SystemExit(f"revpass: --budget {text!r}: give 'min', a number of bytes kept for backward, or "
                     "'peak:BYTES' for the estimated peak of a training step")


def converted(args, model, x, progress=None):
    """``model`` converted as the arguments say; under a budget the planner says its stages on
    stderr (``progress``: a callable given each line instead), unless --no-progress."""
    import revpass

    kw: Dict[str, Any] = {"mode": args.mode}  # with a budget, the mode says what the planner may choose
    if args.budget is not None:
        kw["budget"] = _budget(args.budget)
        kw["progress"] = False if getattr(args, "no_progress", True) else progress or True
    if args.exclude:
        kw["exclude"] = args.exclude
    return revpass.convert(model, x, **kw)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    from revpass.planning.memory_plan import plan_of

    model, x = _prepared(args)
    gm = converted(args, model, x)
    plan = plan_of(gm, gm.revpass_report.mode)
    if args.json:
        rep = gm.revpass_report
        out = {
            "model": args.model, "input_shape": list(x.shape), "mode": rep.mode,
            "sites": [{"path": r.path, "framework": r.framework, "kind": r.kind, "calls": r.calls,
                       "shape": list(r.shape) if r.shape else None, "decision": r.decision, "reason": r.reason}
                      for r in rep],
            "plan": {"kept_bytes_before": plan.kept_before, "kept_bytes_after": plan.kept_after,
                     "estimated_peak_before": plan.peak_before, "estimated_peak_after": plan.peak_after,
                     "rows": [{"node": r.node, "module": r.target, "strategy": r.strategy,
                               "kept_bytes_before": r.kept_before, "kept_bytes_after": r.kept_after,
                               "forward_step": r.forward_step, "backward_step": r.backward_step}
                              for r in plan.rows]},
        }
        print(json.dumps(out, indent=1))
    else:
        print(gm.revpass_report)
        print()
        print(plan)
    return 0


def cmd_convert(args) -> int:
    model, x = _prepared(args)
    gm = converted(args, model, x)
    recipe = {"model": args.model, "kwargs": args.kwargs, "step_mode": args.step_mode, "seed": args.seed,
              "input_shape": list(x.shape), "input_scale": args.input_scale, "input_offset": args.input_offset,
              "mode": args.mode, "budget": args.budget, "exclude": args.exclude}
    save(gm, recipe, args.output)
    print(gm.revpass_report)
    print(f"\nrevpass: wrote {args.output}; load it back with revpass.cli.load({args.output!r}, factory={args.model}), "
          f"or, since you wrote the file and trust it, revpass.cli.load({args.output!r}, trust=True) "
          f"(the command: revpass load {args.output} --trust-file)")
    return 0


def save(gm, recipe: Dict[str, Any], path: str) -> None:
    """The converted model as a file that loads back: how to rebuild it (the factory, its
    arguments, the conversion options) and its state_dict, whose keys are the original model's."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    torch.save({"format": FORMAT, "recipe": recipe, "state_dict": gm.state_dict(),
                "report": str(gm.revpass_report)}, path)


def load(path: str, model: Optional[torch.nn.Module] = None, *, factory=None,
         kwargs: Optional[Dict[str, Any]] = None, trust: bool = False):
    """A model saved by ``revpass convert -o``: rebuilt, converted as the file's recipe says (mode,
    budget, exclude, step mode, example input) and given the saved weights (strictly).

    The file is read with ``torch.load(weights_only=True)``: tensors and plain data only. Its
    recipe also *names* code: the factory (``pkg.mod:factory``, or ``path/to/file.py:factory``,
    a file that is executed) and ``pkg.mod:Name`` strings among the factory's arguments. None of
    it is imported or called unless the caller says so, one of:

    - ``model``: the original model, unconverted, built by the caller (not modified: the
      recipe's step mode is set on a copy); nothing the file names is used;
    - ``factory``: a callable the caller chose, called as ``factory(**kwargs)``; without
      ``kwargs`` it gets the file's arguments, which must then be plain JSON values (an object
      reference in them needs ``kwargs=`` or ``trust=True``);
    - ``trust=True``: import and call what the file names, as the command line that wrote it
      did. Only for files you trust as you would trust running their code (the meaning of
      ``torch.load(weights_only=False)``).

    Without any of them it raises :class:`UntrustedFileError` naming what the file asks to run.
    Errors name the file and the fix (:class:`CliError`; ``UntrustedFileError`` is also a
    ``revpass.errors.RevpassError``).
    """
    if model is not None and (factory is not None or kwargs is not None):
        raise CliError(f"load({path!r}): pass model= or factory= (with kwargs=), not both")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise CliError(f"load({path!r}): model= must be the original torch.nn.Module, got {type(model).__name__}")
    if factory is not None and not callable(factory):
        raise CliError(f"load({path!r}): factory= must be callable, got {type(factory).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CliError(f"load({path!r}): kwargs= must be a dict, got {type(kwargs).__name__}")
    args, state = _read_saved(path)
    file_kwargs = json.loads(args.kwargs) if args.kwargs else {}
    refs = _references(file_kwargs)
    if model is not None:
        net = model
        if args.step_mode:
            from revpass.utils import safe_deepcopy

            net = safe_deepcopy(model)
            _set_step_mode(net, args.step_mode, type(model).__name__)
    elif factory is not None or trust:
        if kwargs is None and refs and not trust:
            raise UntrustedFileError(
                f"{path}: the factory's arguments in the file name objects to import: {', '.join(map(repr, refs))}; "
                "load imports nothing the file names unless told to\n"
                f"pass them yourself, load({path!r}, factory=..., kwargs={{...}}), or, if you trust the file, "
                f"load({path!r}, factory=..., trust=True) (the command: --kwargs JSON, or --trust-file)")
        name = args.model if factory is None else getattr(factory, "__qualname__", repr(factory))
        if factory is None:
            factory = resolve(args.model)
        if kwargs is None:
            kwargs = resolve_kwargs(file_kwargs) if trust else file_kwargs
        net = _instantiate(factory, kwargs, name, args.seed)
        _set_step_mode(net, args.step_mode, name)
    else:
        asks = repr(args.model) + (f", with arguments naming {', '.join(map(repr, refs))}" if refs else "")
        raise UntrustedFileError(
            f"{path} asks to import and call {asks}; load runs no code a file names unless told to\n"
            f"pass the model or its factory yourself, load({path!r}, model=net) or "
            f"load({path!r}, factory=f), or, if you trust the file as you would trust running its code, "
            f"load({path!r}, trust=True) (the command: revpass load {path} --trust-file, or --factory MODEL)")
    x = example_input(args)
    gm = converted(args, net, x)
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        why = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        raise CliError(f"{path}: the saved weights do not fit the model built to load them: {why}") from exc
    return gm


def _references(value: Any) -> List[str]:
    """The ``pkg.mod:Name`` strings in JSON ``value`` (what :func:`resolve_kwargs` would import)."""
    if isinstance(value, str):
        return [value] if _OBJECT.match(value) else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [r for v in items for r in _references(v)]


def _read_saved(path: str):
    """The recipe of a saved model, as the arguments of the command that wrote it, and its
    state_dict; every field checked (the file is data from elsewhere). Runs nothing it names."""
    def bad(why: str) -> CliError:
        return CliError(f"{path} is not a model saved by `revpass convert` ({why})")

    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise bad(f"torch.load(weights_only=True) failed: {type(exc).__name__}: {first}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise bad(f"no format {FORMAT!r}")
    recipe, state = blob.get("recipe"), blob.get("state_dict")
    if not isinstance(recipe, dict):
        raise bad("no recipe")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise bad("no state_dict of tensors")

    def field(key, ok, what):
        v = recipe.get(key)
        if not ok(v):
            raise bad(f"recipe {key!r} is {v!r}, expected {what}")
        return v

    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    args = argparse.Namespace(
        model=field("model", lambda v: isinstance(v, str) and ":" in v, "'package.module:factory'"),
        kwargs=field("kwargs", lambda v: v is None or isinstance(v, str), "JSON text or None"),
        step_mode=field("step_mode", lambda v: v in (None, "s", "m"), "'s', 'm' or None"),
        seed=field("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        input_shape=field("input_shape", lambda v: isinstance(v, list) and v and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v), "a list of positive integers"),
        input_scale=field("input_scale", num, "a number"),
        input_offset=field("input_offset", num, "a number"),
        mode=field("mode", lambda v: v in ("reversible", "exact", "recompute"), "a conversion mode"),
        budget=field("budget", lambda v: v is None or (isinstance(v, str) and (
            v == "min" or v.isdigit() or v.startswith("peak:") and v[5:].isdigit())),
                     "None, 'min', a number of bytes or 'peak:BYTES'"),
        exclude=field("exclude", lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
                      "None or a list of patterns"),
    )
    if args.kwargs:
        try:
            kw = json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            raise bad(f"recipe 'kwargs' is not valid JSON: {exc}") from exc
        if not isinstance(kw, dict):
            raise bad("recipe 'kwargs' is not a JSON object")
    args.input_shape = ",".join(map(str, args.input_shape))
    return args, state


def cmd_load(args) -> int:
    factory = resolve(args.factory) if args.factory else None  # named on the command line: the caller's
    kwargs = None
    if args.kwargs is not None:
        if factory is None and not args.trust_file:
            raise CliError("--kwargs goes with --factory (or --trust-file): the arguments of the factory that builds "
                           "the model")
        try:
            kwargs = resolve_kwargs(json.loads(args.kwargs))
        except json.JSONDecodeError as exc:
            raise CliError(f"--kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise CliError("--kwargs must be a JSON object")
    gm = load(args.file, factory=factory, kwargs=kwargs, trust=args.trust_file)
    print(gm.revpass_report)
    n = len(gm.state_dict())
    print(f"\nrevpass: {args.file} loads back: {n} saved tensors, strictly")
    return 0


def cmd_verify(args) -> int:
    import revpass

    model, x = _prepared(args)
    gm = converted(args, model, x)
    rep = revpass.verify(model, gm, x, rtol=args.rtol, atol=args.atol)
    print(rep)
    return 0 if rep.passed else EXIT_FAIL


def cmd_export(args) -> int:
    from revpass.export import export_onnx, write_graph

    if not args.onnx and not args.graph:
        raise CliError("export: give --onnx FILE and/or --graph FILE (.json, .graphml or .dot)")
    model, x = _prepared(args)
    gm = converted(args, model, x)
    for g in args.graph or []:
        print(f"revpass: wrote {write_graph(gm, g)}")
    if args.onnx:
        print(export_onnx(model if args.original else gm, x, args.onnx))
    return 0


def cmd_bench(args) -> int:
    from revpass.memory import kept_bytes, step_peak, step_time
    from revpass.progress import Progress

    model, x = _prepared(args)
    label = args.mode if args.budget is None else f"{args.mode}, budget={args.budget}"
    # the planner's stages on lines of their own, the bar drawn again at its next step
    variants = [("original", lambda: model),
                (label, lambda: converted(args, model, x, lambda line: sys.stderr.write(f"\r{line:<72}\n")))]
    steps = [(name, what) for name, _ in variants for what in ("convert", "kept", "peak", "time")]
    bar = Progress(len(steps), enabled=not args.no_progress)
    rows = []
    for name, make in variants:
        bar.step(f"{name}: convert")
        m = make()
        bar.step(f"{name}: bytes kept")
        kept = kept_bytes(m, x)
        bar.step(f"{name}: peak")
        peak = step_peak(m, x)
        bar.step(f"{name}: time x{args.repeat}")
        t = step_time(m, x, repeat=args.repeat)
        rows.append({"variant": name, "kept_bytes": kept, "peak_bytes": peak, "step_s": t})
    bar.done()
    o = rows[0]
    if args.json:
        print(json.dumps({"model": args.model, "input_shape": list(x.shape), "rows": rows}, indent=1))
        return 0
    print(f"revpass bench {args.model} on {tuple(x.shape)} (CPU: MemTracker peak less parameters, gradients, "
          f"buffers; median of {args.repeat} training steps)")
    print(f"{'variant':<16} {'kept for backward':>18} {'peak':>12} {'step time':>10} {'peak ratio':>11} "
          f"{'time ratio':>11}")
    for r in rows:
        print(f"{r['variant']:<16} {r['kept_bytes'] / 2**20:>14.2f} MiB {r['peak_bytes'] / 2**20:>8.2f} MiB "
              f"{r['step_s'] * 1e3:>7.0f} ms {o['peak_bytes'] / r['peak_bytes']:>10.2f}x "
              f"{r['step_s'] / o['step_s']:>10.2f}x")
    return 0


def _prepared(args):
    model = build(args)
    x = example_input(args)
    _run_checked(model, x)
    return model, x


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="package.module:factory or path/to/file.py:factory")
    common.add_argument("--kwargs", default=None, help="factory arguments as JSON; 'pkg.mod:Name' strings "
                                                       "are resolved to objects")
    common.add_argument("--input-shape", default=None, help="example input shape, e.g. 4,2,3,32,32")
    common.add_argument("--input-scale", type=float, default=1.0, help="the input is randn * scale + offset")
    common.add_argument("--input-offset", type=float, default=0.0)
    common.add_argument("--step-mode", choices=("s", "m"), default=None, help="SpikingJelly step mode to set")
    common.add_argument("--mode", default="reversible", choices=("reversible", "exact", "recompute"),
                        help="conversion mode (default reversible)")
    common.add_argument("--budget", default=None,
                        help="bytes kept for backward, 'peak:BYTES' (the estimated peak of a training step), or "
                             "'min': the planner chooses among the strategies --mode allows")
    common.add_argument("--exclude", nargs="*", default=None, help="module-path patterns left unchanged")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--no-progress", action="store_true",
                        help="say nothing on stderr while it works (the planner's stages under --budget, the "
                             "bench's progress bar)")
    p = argparse.ArgumentParser(prog="revpass", description="revpass: reversible spiking nodes for existing SNNs")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", parents=[common], help="neuron sites, decisions and the memory plan")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("convert", parents=[common], help="convert and save a model that loads back")
    s.add_argument("-o", "--output", required=True, help="file to write (.pt)")
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser(
        "load", help="load a file written by convert -o (runs the code it names only with --trust-file)",
        description="Rebuild a model saved by `revpass convert -o` and load its weights. The file's recipe names "
                    "code (its factory, 'pkg.mod:Name' arguments, a path/to/file.py that is executed): it is run "
                    "only with --trust-file; otherwise give the factory yourself with --factory.")
    s.add_argument("file", help="a .pt file written by revpass convert -o")
    s.add_argument("--trust-file", action="store_true",
                   help="import and call what the file names (its factory and the objects among its arguments), "
                        "as torch.load(weights_only=False) would: only for files you trust as you would trust "
                        "running their code")
    s.add_argument("--factory", default=None, help="build the model with this package.module:factory or "
                                                   "path/to/file.py:factory instead of the file's")
    s.add_argument("--kwargs", default=None, help="the factory's arguments as JSON ('pkg.mod:Name' strings resolved), "
                                                  "instead of the file's")
    s.add_argument("--debug", action="store_true", help="show tracebacks")
    s.set_defaults(fn=cmd_load)
    s = sub.add_parser("verify", parents=[common], help="gradient equivalence; exit code 1 when it fails")
    s.add_argument("--rtol", type=float, default=1e-5)
    s.add_argument("--atol", type=float, default=1e-6)
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("export", parents=[common], help="ONNX (checked by onnxruntime) and graph files")
    s.add_argument("--onnx", default=None, help="ONNX file to write")
    s.add_argument("--graph", action="append", default=None, help="graph file (.json, .graphml, .dot); repeatable")
    s.add_argument("--original", action="store_true", help="export the original model to ONNX (through its "
                                                            "exact conversion: the same function)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("bench", parents=[common], help="memory and time, original vs converted")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        # revpass's own errors say where and what to do on their later lines: keep them, joined
        msg = " -- ".join(lines) if isinstance(exc, (CliError, RevpassError)) else lines[0]
        name = "" if isinstance(exc, CliError) else f"{type(exc).__name__}: "
        print(f"revpass {args.command}: error: {name}{msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CliError) else EXIT_FAIL


def _entry() -> None:
    raise SystemExit(main())


__all__: List[str] = ["main", "load", "save", "resolve", "resolve_kwargs", "CliError", "UntrustedFileError"]
