"""The ``nvjax`` command line.

    nvjax run CONFIG --out DIR     the Monte Carlo reliability sweep (writes summary.json,
                                   results.csv, accuracy_vs_time.png)
    nvjax lifetime CONFIG --out DIR
                                   a chip's working life: inferences, drift, read disturb and
                                   reprogramming (writes summary.json, results.csv, events.csv,
                                   lifetime.png)
    nvjax bench [--json] [...]     Monte Carlo throughput on the standard workloads
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


def _cmd_run(args) -> int:
    from . import config as cfg_mod
    from . import sweep
    try:
        cfg = cfg_mod.load(args.config)
    except cfg_mod.ConfigError as e:
        print(f"nvjax run: invalid config: {e}", file=sys.stderr)
        return 2
    if args.no_progress:
        cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), "progress": False}, cfg_mod.RunConfig)
    os.makedirs(args.out, exist_ok=True)
    summary = sweep.reliability(cfg, args.out)
    t = summary["timings"]
    print(sweep.format_table(summary))
    print(f"\n{cfg.sweep.num_instances} chip instances per point; sweep {t['sweep_s']:.1f} s "
          f"({t['instances_per_s']:.0f} instances/s incl. compile); results in {args.out}/")
    return 0


def _cmd_lifetime(args) -> int:
    from . import config as cfg_mod
    from . import lifetime
    try:
        cfg = cfg_mod.load_lifetime(args.config)
    except cfg_mod.ConfigError as e:
        print(f"nvjax lifetime: invalid config: {e}", file=sys.stderr)
        return 2
    if args.no_progress:
        cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), "progress": False},
                                cfg_mod.LifetimeRunConfig)
    os.makedirs(args.out, exist_ok=True)
    summary = lifetime.run_config(cfg, args.out)
    t = summary["timings"]
    print(lifetime.format_report(summary))
    print(f"\n{cfg.num_chips} chips; simulation {t['simulate_s']:.1f} s "
          f"({t['chip_steps_per_s']:.0f} chip-steps/s incl. compile); results in {args.out}/")
    return 0


def _cmd_bench(args) -> int:
    from . import bench
    res = bench.run(instances=args.instances, chunk_size=args.chunk_size,
                    workloads=args.workloads, numpy_baseline=not args.no_numpy,
                    aihwkit_python=args.aihwkit_python, log=lambda s: print(s, file=sys.stderr))
    if not args.json:
        print(bench.format_report(res))
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nvjax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="Monte Carlo reliability sweep from a YAML config")
    r.add_argument("config", help="YAML run configuration (see configs/)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)
    lt = sub.add_parser("lifetime", help="lifetime loop with read disturb and reprogramming")
    lt.add_argument("config", help="YAML lifetime configuration (see configs/lifetime.yaml)")
    lt.add_argument("--out", required=True, help="output folder")
    lt.add_argument("--no-progress", action="store_true", help="no progress bar")
    lt.set_defaults(func=_cmd_lifetime)
    b = sub.add_parser("bench", help="throughput on the standard workloads (DESIGN.md §11)")
    b.add_argument("--json", action="store_true", help="print only the JSON result line")
    b.add_argument("--instances", type=int, default=64, help="timed instances per workload")
    b.add_argument("--chunk-size", type=int, default=8, help="instances per compiled chunk")
    b.add_argument("--workloads", nargs="+", default=["pcm-ideal-io", "pcm-default-io"])
    b.add_argument("--no-numpy", action="store_true", help="skip the NumPy baseline")
    b.add_argument("--aihwkit-python", default=None,
                   help="python of a venv with aihwkit to run ../shared/tools/aihwkit_mc.py beside")
    b.set_defaults(func=_cmd_bench)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
