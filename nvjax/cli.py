"""The ``nvjax`` command line.

    nvjax run CONFIG --out DIR     the Monte Carlo reliability sweep (writes summary.json,
                                   results.csv, accuracy_vs_time.png); shards chips over all
                                   devices; resumable (rerun the same command); multi-process
                                   with --coordinator/--num-processes/--process-id or the
                                   NVJAX_COORDINATOR/NVJAX_NUM_PROCESSES/NVJAX_PROCESS_ID variables
    nvjax lifetime CONFIG --out DIR
                                   a chip's working life: inferences, drift, read disturb and
                                   reprogramming (writes summary.json, results.csv, events.csv,
                                   lifetime.png)
    nvjax bench [--json] [...]     Monte Carlo throughput on the two standard workloads (an
                                   MLP 784-256-128-10 on PCM: pcm-ideal-io, pcm-default-io)

Every config key is documented in the README's "Configuration reference" and in the commented
configs/*.yaml of the repository. Units: conductance µS, time s, voltage V.

This module imports ``config``, ``jobs``, ``bench``, ``_runtime`` and ``_version``, each inside the
command that needs it, so that ``nvjax --help`` and ``nvjax --version`` do not load JAX.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


def _cmd_run(args) -> int:
    from . import config as cfg_mod
    from . import jobs
    try:
        cfg = cfg_mod.load(args.config)
    except cfg_mod.ConfigError as e:
        print(f"nvjax run: invalid config: {e}", file=sys.stderr)
        return 2
    over = {}
    if args.no_progress:
        over["progress"] = False
    dist = {k: v for k, v in (("coordinator_address", args.coordinator),
                              ("num_processes", args.num_processes),
                              ("process_id", args.process_id)) if v is not None}
    if dist:  # command-line flags override the config's `distributed` section
        over["distributed"] = {**cfg_mod.to_dict(cfg)["distributed"], **dist}
    if over:
        try:
            cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), **over}, cfg_mod.RunConfig)
        except cfg_mod.ConfigError as e:
            print(f"nvjax run: invalid option: {e}", file=sys.stderr)
            return 2
    d = cfg.distributed  # before any JAX computation
    try:
        jobs.init_distributed(d.coordinator_address, d.num_processes, d.process_id)
    except ValueError as e:
        print(f"nvjax run: {e}", file=sys.stderr)
        return 2
    import jax
    main = jax.process_index() == 0
    if main:
        os.makedirs(args.out, exist_ok=True)
    summary = jobs.reliability(cfg, args.out)
    if not main:
        return 0
    t, c = summary["timings"], summary["chunks"]
    print(jobs.format_table(summary))
    print(f"\n{cfg.sweep.num_instances} chip instances per point on {c['devices']} device(s), "
          f"{c['processes']} process(es); sweep {t['sweep_s']:.1f} s "
          f"({t['instances_per_s']:.0f} instances/s incl. compile"
          + (f", {c['loaded']} of {c['total']} chunks resumed" if c["loaded"] else "")
          + f"); results in {args.out}/")
    return 0


def _cmd_lifetime(args) -> int:
    from . import config as cfg_mod
    from . import jobs
    try:
        cfg = cfg_mod.load_lifetime(args.config)
    except cfg_mod.ConfigError as e:
        print(f"nvjax lifetime: invalid config: {e}", file=sys.stderr)
        return 2
    if args.no_progress:
        cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), "progress": False},
                                cfg_mod.LifetimeRunConfig)
    os.makedirs(args.out, exist_ok=True)
    summary = jobs.run_lifetime(cfg, args.out)
    t = summary["timings"]
    print(jobs.format_lifetime_report(summary))
    print(f"\n{cfg.num_chips} chips; simulation {t['simulate_s']:.1f} s "
          f"({t['chip_steps_per_s']:.0f} chip-steps/s incl. compile); results in {args.out}/")
    return 0


def _int_list(text: str):
    """'10,100,1000' -> (10, 100, 1000); '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        vals = tuple(int(float(v)) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _vmap_width(text: str):
    """'none' -> 0 (vmap the whole chunk); otherwise an int >= 1."""
    if text.strip().lower() == "none":
        return 0
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"vmap width must be an int >= 1 or 'none', got {text!r}")
    return v


def _cmd_bench(args) -> int:
    from . import bench
    width = bench.VMAP_WIDTH if args.vmap_width is None else (args.vmap_width or None)
    res = bench.run(instances=args.instances, chunk_size=args.chunk_size, vmap_width=width,
                    workloads=args.workloads, generators=args.generators or bench.GENERATORS,
                    repeat=args.repeat, counts=args.counts,
                    num_devices=args.devices, numpy_baseline=not args.no_numpy,
                    aihwkit_python=args.aihwkit_python, aihwkit_threads=args.aihwkit_threads,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    if not args.json:
        print(bench.format_report(res))
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    from ._version import __version__
    p = argparse.ArgumentParser(prog="nvjax", description=__doc__.split("\n\nThis module imports")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nvjax {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="Monte Carlo reliability sweep from a YAML config")
    r.add_argument("config", help="YAML run configuration (see configs/)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's coordinator address "
                        "(else distributed.coordinator_address, else $NVJAX_COORDINATOR)")
    r.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-process run: number of processes (else $NVJAX_NUM_PROCESSES)")
    r.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-process run: this process's id, 0..N-1 (else $NVJAX_PROCESS_ID)")
    r.set_defaults(func=_cmd_run)
    lt = sub.add_parser("lifetime", help="lifetime loop with read disturb and reprogramming")
    lt.add_argument("config", help="YAML lifetime configuration (see configs/lifetime.yaml)")
    lt.add_argument("--out", required=True, help="output folder")
    lt.add_argument("--no-progress", action="store_true", help="no progress bar")
    lt.set_defaults(func=_cmd_lifetime)
    b = sub.add_parser("bench", help="chip instances/s on the standard workloads, vs the machine's limit")
    b.add_argument("--json", action="store_true", help="print only the JSON result line")
    b.add_argument("--instances", type=int, default=64,
                   help="timed instances per workload and generator (default 64)")
    b.add_argument("--repeat", type=int, default=3, help="timed runs, the best is kept (default 3)")
    b.add_argument("--chunk-size", type=int, default=None,
                   help="instances per compiled chunk (default: bench.CHUNK_SIZES per workload)")
    b.add_argument("--vmap-width", type=_vmap_width, default=None,
                   help="instances vmapped together inside a chunk, or 'none' for the whole chunk "
                        "(default: bench.VMAP_WIDTH)")
    b.add_argument("--workloads", nargs="+", default=["pcm-ideal-io", "pcm-default-io"])
    b.add_argument("--generators", nargs="+", default=None,
                   help="generators to time (default: all of nvjax.prng.IMPLS); the fastest one "
                        "gives the headline numbers")
    b.add_argument("--counts", type=_int_list, default=(10, 100, 1000, 10000),
                   help="instance counts for instances/s and peak memory vs count, each in a "
                        "fresh process (default 10,100,1000,10000; 'none' skips)")
    b.add_argument("--devices", type=_int_list, default=(1, 2, 4),
                   help="forced host device counts for the scaling runs, in subprocesses "
                        "(default 1,2,4; 'none' skips)")
    b.add_argument("--no-numpy", action="store_true", help="skip the NumPy baseline")
    b.add_argument("--aihwkit-python", default=None,
                   help="python of a venv with IBM aihwkit, to time its side of the same workloads "
                        "(needs the aihwkit_mc.py script beside the repository, see the README)")
    b.add_argument("--aihwkit-threads", type=_int_list, default=(1, 2),
                   help="torch thread counts tried for aihwkit, its fastest kept (default 1,2)")
    b.set_defaults(func=_cmd_bench)
    args = p.parse_args(argv)
    from ._runtime import limit_malloc_arenas
    limit_malloc_arenas()  # one malloc arena, before JAX starts its threads
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
