"""The command line: run the benchmarks asked for, print their tables, write the results as
JSON and the same tables as markdown beside it. Every child is reaped, even on Ctrl-C."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import BENCHMARKS
from bench.harness import BenchError, Ctx, become_subreaper, build_c_helpers, close_all_helpers, log, reap_orphans
from bench.stats import tidy
from bench.targets import summary


def module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.{name}")


def native_status() -> tuple[bool, str | None]:
    from monitor.sources import native

    return bool(native.AVAILABLE), native.REASON


def meta(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    available, reason = native_status()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kernel": platform.release(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick, "seed": seed,
        "load_average": os.getloadavg(), "native_decoder": "built" if available else "not built", "native_reason": reason,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    out = [f"Measured with `scripts/bench{' --quick' if m['quick'] else ''}` on {m['date'][:10]}: Linux {m['kernel']}, "
           f"{m['cpus']} CPUs, Python {m['python']}. Every ratio is against a baseline measured in the same run.\n"]
    if targets := summary([results]):
        out.append(f"### The project's targets in this run (`python -m bench.targets` gives the medians of several)\n\n{targets}\n")
    for name in BENCHMARKS:
        if name not in results:
            continue
        mod = module(name)
        out.append(f"### {mod.TITLE}\n")
        res = results[name]
        out.append(f"Failed: {res['error']}\n" if "error" in res else mod.tables(res) + "\n")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description="monitor's benchmarks, each against a baseline "
                                     "measured in the same run (see bench/__init__.py).")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes in all), for tests")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--methods", default=None, help="latency, storm: only these methods (their result keys)")
    parser.add_argument("--out", default="bench-results/latest.json", help="JSON results (the .md goes next to it)")
    parser.add_argument("--seed", type=int, default=None, help="for the random exit phases and sleep times")
    args = parser.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(args.only) - set(BENCHMARKS)
    if unknown or not args.only:
        parser.error(f"--only takes a comma-separated subset of {', '.join(BENCHMARKS)}")
    return args


def run_failures(res: dict[str, Any]) -> list[str]:
    """The errors of single runs (a source failing at one size), wherever they nest."""
    found: list[str] = []
    for value in res.values():
        if isinstance(value, dict):
            found += [value["error"]] if "error" in value else run_failures(value)
    return found


def run_benchmarks(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    results: dict[str, Any] = {"meta": meta(args, seed)}
    failed = False
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as tmp:
        native = native_status()[0]
        if not native:
            log(f"native decoder not built: its rows say so ({results['meta']['native_reason']})")
        bins = build_c_helpers(Path(tmp))
        for name in (b for b in BENCHMARKS if b in args.only):
            mod = module(name)
            sizes = mod.QUICK if args.quick else mod.FULL
            ctx = Ctx(bins, sizes, Path(tmp), native, random.Random(f"{seed}-{name}"),
                      set(args.methods.split(",")) if args.methods else None)
            started = time.monotonic()
            try:
                results[name] = mod.run(ctx)
            except BenchError as err:
                log(f"{name} failed: {err}")
                results[name] = {"error": str(err)}
                failed = True
            except Exception as err:  # a bug in one benchmark must not cost the others' results
                log(f"{name} crashed:\n{traceback.format_exc()}")
                results[name] = {"error": f"{type(err).__name__}: {err}"}
                failed = True
            if run_failures(results[name]):
                log(f"{name}: some runs failed (see the table); the exit status will say so")
                failed = True
            results[name]["sizes"] = sizes.__dict__
            results[name]["elapsed_s"] = round(time.monotonic() - started, 1)
            if "error" not in results[name]:
                print(f"\n## {mod.TITLE}\n\n{mod.tables(results[name])}\n", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tidy(results), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    if targets := summary([tidy(results)]):
        print(f"\n## The project's targets in this run\n\n{targets}\n", flush=True)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    become_subreaper()
    # SIGTERM must unwind through the finally below like Ctrl-C does, so that
    # every helper (and every helper's children) is reaped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_benchmarks(args)
    except BenchError as err:
        log(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: stopping and reaping every helper")
        return 130
    finally:
        close_all_helpers()
        reap_orphans()
