"""Everything the "GPU speed" issue asks for, measured in one call on one GPU.

    .venv/bin/python benchmarks/gpu_speed.py --out benchmarks/results        # on a CUDA machine
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --quick --out /tmp/gs  # crash test

Rows (LeNet-BN, avg pool, sigmoid; batch 256, lr 1.0; the 60k/10k SYNTHETIC set resident on
the device; test accuracy evaluated at every epoch end; each row after a warm-up run that sees
both batch shapes, so compiling happens in the warm-up, whose time is reported separately):

* bnviz nn.BatchNorm / scratch BN, eager and compiled (``Config(compile=<mode>)``, one row per
  ``--modes`` entry; default 'reduce-overhead' (CUDA graphs) and 'default'), ``--epochs`` (10)
  epochs: wall seconds for the whole ``Trainer.run()`` and examples/s.
* d2l ``train_ch6`` fed by its per-sample PIL/ToTensor DataLoader (4 workers), same device and
  data, ``--d2l-epochs`` (2) epochs: examples/s (its wall time is for fewer epochs).
* the dashboard's overhead: ``benchmarks/dashboard_overhead.py`` (written separately); if it
  is missing, the row says so.

Targets (the issue): nn.BatchNorm 10 epochs <= 1.0 s, scratch <= 2.0 s, >= 20x d2l's
examples/s, dashboard >= 90 % of headless throughput. The script prints a markdown table, the
device and versions, and writes ``gpu_speed.json`` and ``gpu_speed.md`` to ``--out``.
``--quick`` uses tiny sizes (a crash test, e.g. on a CPU; its numbers mean nothing). On a CPU
the compiled rows fall back to eager (their note says so) unless ``--force-compile``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import throughput as tp  # noqa: E402  (also sets the Agg backend before d2l)
import torch  # noqa: E402

from bnviz import make_synthetic  # noqa: E402
from bnviz.data import resolve_device  # noqa: E402

TARGETS = {"torch": 1.0, "scratch": 2.0}  # seconds for 10 epochs of 60k examples
TARGET_VS_D2L = 20.0
TARGET_DASHBOARD = 0.90


def dashboard_overhead(device: torch.device, epochs: int, train_size: int, test_size: int, quick: bool):
    """Call ``benchmarks/dashboard_overhead.py``'s measuring function if the file exists.

    Returns (result or None, note). A function ``measure`` / ``measure_overhead`` / ``run`` is
    called with the keyword arguments it accepts among device / epochs / train_size / test_size
    / quick; a script with only a command line is run as a subprocess (last line
    ``ratio dashboard/headless: X.XX``).
    """
    if not (HERE / "dashboard_overhead.py").exists():
        return None, "skipped: benchmarks/dashboard_overhead.py does not exist yet"
    try:
        mod = importlib.import_module("dashboard_overhead")
    except Exception as err:
        return None, f"skipped: importing dashboard_overhead failed ({type(err).__name__}: {err})"
    fn = next((getattr(mod, n) for n in ("measure", "measure_overhead", "run") if callable(getattr(mod, n, None))), None)
    if fn is None:  # a command-line script: run it and read its last line
        return _dashboard_subprocess(train_size, test_size, epochs, quick)
    offered = {"device": str(device), "epochs": epochs, "train_size": train_size,
               "test_size": test_size, "quick": quick}
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in offered.items() if k in params}
    try:
        return fn(**kwargs), f"{mod.__name__}.{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    except Exception as err:
        return None, f"failed: {type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"


def _dashboard_subprocess(train_size: int, test_size: int, epochs: int, quick: bool):
    """``python benchmarks/dashboard_overhead.py --train-size N ...``; its last line is
    ``ratio dashboard/headless: X.XX``. The lab picks its own device (CUDA when present)."""
    import re
    import subprocess

    cmd = [sys.executable, str(HERE / "dashboard_overhead.py"), "--train-size", str(train_size),
           "--test-size", str(test_size), "--epochs", str(min(epochs, 2))]
    if quick:
        cmd += ["--repeats", "1"]
    shown = "python benchmarks/dashboard_overhead.py " + " ".join(cmd[2:])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return None, f"failed: `{shown}` took more than 600 s"
    m = re.search(r"ratio dashboard/headless: ([\d.]+)", done.stdout)
    if done.returncode != 0 or m is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"failed: `{shown}` exited {done.returncode}: {tail[0]}"
    return {"fraction": float(m.group(1)), "output": done.stdout}, f"`{shown}`"


def _fraction(result) -> float | None:
    """The dashboard's throughput as a fraction of headless, from whatever dict it returns."""
    if not isinstance(result, dict):
        return None
    for key in ("fraction", "ratio", "attached_over_headless", "relative_throughput"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda (default when present), cpu, auto")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per bnviz row (default 10)")
    ap.add_argument("--d2l-epochs", type=int, default=2, help="epochs for d2l train_ch6 (default 2)")
    ap.add_argument("--modes", default="reduce-overhead,default",
                    help="torch.compile modes, comma-separated (default reduce-overhead,default); '' = none")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a crash test, numbers mean nothing")
    ap.add_argument("--force-compile", action="store_true", help="compile on a CPU too (slow: minutes)")
    ap.add_argument("--skip-d2l", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_speed.json / .md")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        ap.error(str(err))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from bnviz.train import COMPILE_MODES

    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        ap.error(f"unknown compile mode(s) {bad}; valid: {', '.join(COMPILE_MODES)}")
    if args.quick:
        # d2l's train_ch6 needs >= 5 batches per epoch (it plots every num_batches // 5).
        train_size, test_size, epochs, d2l_epochs, warmup = 1280, 256, 1, 1, 300
    else:
        train_size, test_size, epochs, d2l_epochs, warmup = 60000, 10000, args.epochs, args.d2l_epochs, 512
    if device.type != "cuda" and not args.quick:
        print(f"note: no GPU ({device}): these are not GPU numbers", flush=True)

    data = make_synthetic(60000, 10000).subset(train_size, test_size).to(device)
    info = tp.machine_info(device)
    print(f"device: {info['device']} ({info['device_name']}), torch {info['torch']}, "
          f"CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, python {info['python']}, "
          f"{info['cpu_count']} CPU cores", flush=True)
    print(f"data: {data.label}, {train_size} train / {test_size} test, batch 256, lr 1.0, "
          f"test evaluated every epoch", flush=True)

    rows = []
    for norm in ("torch", "scratch"):
        for compile_ in [False] + modes:
            request = compile_
            if compile_ and device.type != "cuda" and args.force_compile:
                request = "force"
            t = time.perf_counter()
            try:
                r = tp.time_bnviz(data, norm, epochs, compile=request, warmup=warmup)
                r["compile"] = compile_
                r["name"] = (f"bnviz {'nn.BatchNorm' if norm == 'torch' else 'scratch BN'}"
                             + (f" compiled ({compile_})" if compile_ else " eager"))
            except Exception as err:
                r = {"name": f"bnviz {norm} {compile_ or 'eager'}", "norm": norm, "compile": compile_,
                     "error": f"{type(err).__name__}: {err}", "wall_s": None, "examples_per_s": None}
            r["epochs"] = epochs
            rows.append(r)
            status = (f"{r['wall_s']:.2f} s, {r['examples_per_s']:.0f} ex/s" if r.get("wall_s")
                      else r.get("error"))
            print(f"  {r['name']}: {status} ({time.perf_counter() - t:.0f} s with warm-up)", flush=True)

    d2l = None
    if not args.skip_d2l:
        try:
            d2l = tp.time_d2l(data, d2l_epochs, device, warmup=warmup)
            d2l["epochs"] = d2l_epochs
            print(f"  d2l train_ch6: {d2l['examples_per_s']:.0f} ex/s ({d2l_epochs} epochs)", flush=True)
        except Exception as err:
            d2l = {"name": "d2l train_ch6", "error": f"{type(err).__name__}: {err}", "examples_per_s": None}

    dash, dash_note = dashboard_overhead(device, epochs, train_size, test_size, args.quick)

    # ---- the table
    def fmt(x, f):
        return "—" if x is None else format(x, f)

    lines = [f"### GPU speed: {info['device_name']} ({info['device']}), torch {info['torch']}"
             + (" — QUICK crash-test sizes, numbers mean nothing" if args.quick else ""), "",
             f"Data: {data.label}, {train_size} train / {test_size} test, batch 256, lr 1.0, "
             f"LeNet-BN (avg pool, sigmoid), test accuracy every epoch. "
             f"Command: `python benchmarks/gpu_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "",
             "| run | epochs | wall s | examples/s | vs d2l | target | warm-up s (compile) | test acc | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    d2l_eps = d2l.get("examples_per_s") if d2l else None
    for r in rows:
        vs = r["examples_per_s"] / d2l_eps if (r.get("examples_per_s") and d2l_eps) else None
        target = TARGETS[r["norm"]] * epochs / 10 * train_size / 60000
        met = None if (r.get("wall_s") is None or args.quick) else r["wall_s"] <= target
        note = r.get("error") or r.get("message") or ""
        ci = r.get("compile_info")
        if ci:
            note = (note + f" mode {ci['mode']}, graphs for batch sizes {sorted(ci['shapes'])}, "
                    f"{r.get('graphs_compiled_in_timed_run', 0)} compiled during the timed run").strip()
            if r.get("cudagraph_skips"):
                note += f"; inductor skipped CUDA graphs {r['cudagraph_skips']}× (see TORCH_LOGS=cudagraphs)"
        lines.append(f"| {r['name']} | {r['epochs']} | {fmt(r.get('wall_s'), '.3f')} | "
                     f"{fmt(r.get('examples_per_s'), ',.0f')} | {fmt(vs, '.1f')}× | "
                     f"≤ {target:.2g} s: {'—' if met is None else ('met' if met else 'NOT met')} | "
                     f"{fmt(r.get('warmup_s'), '.1f')} | {fmt(r.get('test_acc'), '.3f')} | {note} |")
    if d2l:
        lines.append(f"| d2l train_ch6 (PIL DataLoader, 4 workers) | {d2l.get('epochs', '—')} | "
                     f"{fmt(d2l.get('wall_s'), '.2f')} | {fmt(d2l_eps, ',.0f')} | 1× | "
                     f"bnviz nn.BatchNorm ≥ {TARGET_VS_D2L:g}× this | — | {fmt(d2l.get('test_acc'), '.3f')} | "
                     f"{d2l.get('error', '')} |")
    frac = _fraction(dash)
    lines.append(f"| dashboard attached vs headless | | | | | ≥ {TARGET_DASHBOARD:.0%}: "
                 f"{'—' if frac is None else ('met' if frac >= TARGET_DASHBOARD else 'NOT met')} | | | "
                 f"{'' if frac is None else f'{frac:.1%} of headless; '}{dash_note.splitlines()[0]} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "quick": args.quick, "train_size": train_size, "test_size": test_size,
              "rows": rows, "d2l": d2l, "dashboard": dash, "dashboard_note": dash_note,
              "argv": argv if argv is not None else sys.argv[1:]}
    (out / "gpu_speed.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_speed.md").write_text(table + "\n\nversions: " + json.dumps(info) + "\n")
    print(f"wrote {out / 'gpu_speed.json'} and {out / 'gpu_speed.md'}")
    return result


if __name__ == "__main__":
    main()
