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
configs/*.yaml of the repository. A key left out takes its default; run and lifetime print the
resolved config first, each default marked. Units: conductance µS, time s, voltage V.

run and lifetime keep JAX's persistent compilation cache in $NVJAX_CACHE_DIR/xla (default
~/.cache/nvjax/xla), so a rerun does not compile again; NVJAX_COMPILATION_CACHE=0 turns it off.

Errors in what you supplied (a config value, an option, a path, an output folder holding another
run, a corrupt file) end the command with one line, "nvjax <command>: error: <message>" naming
the key, option or file, and exit status 2; Ctrl-C ends it with exit status 130 (rerun the same
command to resume a run). A warning of nvjax's own (e.g. a model used outside its validity range,
such as the first-order IR-drop form on large tiles) is one line, "nvjax <command>: warning:
<message>", and the command goes on.

This module imports ``config``, ``jobs``, ``bench``, ``prng``, ``_checks``, ``_runtime`` and
``_version``, each inside the command that needs it, so that ``nvjax --help`` and
``nvjax --version`` do not load JAX.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import warnings

__all__ = ["main"]


#: What Ctrl-C prints after "nvjax <command>: " (exit status 130).
_INTERRUPTED = {
    "run": "interrupted; rerun the same command to resume (finished chunks are kept)",
    "lifetime": "interrupted; rerun the same command to resume (a lifetime run starts over; "
                "trained weights in --out are reused)",
    "bench": "interrupted",
}


#: Functions in which a raised exception is printed and dropped by Python (garbage-collector and
#: finalizer callbacks, e.g. JAX's ``_xla_gc_callback``): a Ctrl-C landing there is re-delivered.
_SWALLOWING = ("_xla_gc_callback", "__del__")


#: Re-delivery timers of :func:`_on_sigint` not yet fired, and whether the command has already
#: been interrupted (a late re-delivery must not interrupt the exit: status 130, not −SIGINT).
_PENDING = []
_STATE = {"interrupted": False}


def _on_sigint(signum, frame):
    """Ctrl-C: KeyboardInterrupt, unless the interpreter is inside a callback that would swallow
    it; then the signal is sent again a moment later, so one Ctrl-C always ends the command.
    Once the command has been interrupted, further (re-delivered) signals are ignored."""
    if _STATE["interrupted"]:
        return
    f, depth = frame, 0
    while f is not None and depth < 8:
        if f.f_code.co_name in _SWALLOWING:
            t = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
            t.daemon = True
            _PENDING.append(t)
            t.start()
            return
        f, depth = f.f_back, depth + 1
    _STATE["interrupted"] = True
    raise KeyboardInterrupt


def _check_out(out: str) -> None:
    """Refuse an --out that exists and is not a folder (before any work)."""
    from ._checks import UserError
    if not out.strip():
        raise UserError("--out: an output folder is needed, got an empty path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")


def _prepare_out(out: str) -> None:
    """Create the output folder (and its parents) and make sure a file can be written there."""
    from ._checks import UserError
    _check_out(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".nvjax-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot create or write the output folder "
                        f"({e.strerror or e})") from None


def _resolved_config(path: str, cfg, options=()) -> str:
    """The resolved config as YAML text, every key the file leaves out marked ``# default``
    (``options``: dotted keys set by command-line options, marked so)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    lines = []

    def walk(obj, given, indent, prefix):
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            here = isinstance(given, dict) and f.name in given
            mark = "" if here else "  # default"
            if prefix + f.name in options:
                mark = "  # command-line option"
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:{mark + ' (whole section)' if not here else ''}")
                walk(value, given.get(f.name) if here else None, indent + 1,
                     f"{prefix}{f.name}.")
            else:
                lines.append(f"{pad}{f.name}: {json.dumps(value, ensure_ascii=False)}{mark}")
    walk(cfg, raw, 0, "")
    return "\n".join(lines)


def _print_resolved(cmd: str, path: str, cfg, options=()) -> None:
    print(f"nvjax {cmd}: config {path}, resolved (keys marked '# default' are not in the file "
          "and take their documented default):")
    print(_resolved_config(path, cfg, options), flush=True)


#: Environment: the folder of the persistent compilation cache of ``nvjax run``/``lifetime``,
#: and a switch to turn it off (``0``).
ENV_CACHE_DIR = "NVJAX_CACHE_DIR"
ENV_COMPILATION_CACHE = "NVJAX_COMPILATION_CACHE"


def _compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache for this command: a rerun of the same config
    (same programs) loads its compiled chunks instead of compiling them again (the quickstart:
    7 s, then 4.5 s). The folder is ``$NVJAX_CACHE_DIR/xla`` (default
    ``$XDG_CACHE_HOME/nvjax/xla``, else ``~/.cache/nvjax/xla``); ``NVJAX_COMPILATION_CACHE=0``
    turns it off, and a cache already chosen with JAX's own ``JAX_COMPILATION_CACHE_DIR`` is
    left as it is. Only compiled programs are stored, so results are the same with and without
    it."""
    if os.environ.get(ENV_COMPILATION_CACHE, "1") == "0" \
            or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "nvjax")
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _cmd_run(args) -> int:
    from . import config as cfg_mod
    from . import jobs
    _compilation_cache()
    cfg = cfg_mod.load(args.config)
    _check_out(args.out)
    over = {}
    if args.no_progress:
        over["progress"] = False
    dist = {k: v for k, v in (("coordinator_address", args.coordinator),
                              ("num_processes", args.num_processes),
                              ("process_id", args.process_id)) if v is not None}
    if dist:  # command-line flags override the config's `distributed` section
        over["distributed"] = {**cfg_mod.to_dict(cfg)["distributed"], **dist}
    if over:
        cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), **over}, cfg_mod.RunConfig,
                                source="command-line options (--coordinator, --num-processes, "
                                       "--process-id)")
    d = cfg.distributed  # before any JAX computation
    jobs.init_distributed(d.coordinator_address, d.num_processes, d.process_id,
                          initialization_timeout_s=d.startup_timeout_s)
    import jax
    from ._checks import UserError
    from ._runtime import first_error
    main = jax.process_index() == 0
    problem = None
    if main:  # the output folder is process 0's; its error must stop every process
        try:
            _prepare_out(args.out)
        except UserError as e:
            problem = str(e)
    problem = first_error(problem)
    if problem:
        raise UserError(problem)
    if main:
        _print_resolved("run", args.config, cfg,
                        {"progress"} & set(over) | {f"distributed.{k}" for k in dist})
    summary = jobs.reliability(cfg, args.out)
    if not main:
        return 0
    t, c = summary["timings"], summary["chunks"]
    print(jobs.format_table(summary))
    print(f"\n{cfg.sweep.num_instances} chip instances per point on {c['devices']} device(s), "
          f"{c['processes']} process(es); sweep {t['sweep_s']:.1f} s "
          f"({t['instances_per_s']:.0f} instances/s; "
          + ("compiled while the model trained" if t.get("compiled_during_training")
             else "incl. compile")
          + (f", {c['loaded']} of {c['total']} chunks resumed" if c["loaded"] else "")
          + f"); results in {args.out}/")
    return 0


def _cmd_lifetime(args) -> int:
    from . import config as cfg_mod
    from . import jobs
    _compilation_cache()
    cfg = cfg_mod.load_lifetime(args.config)
    if args.no_progress:
        cfg = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), "progress": False},
                                cfg_mod.LifetimeRunConfig)
    _prepare_out(args.out)
    _print_resolved("lifetime", args.config, cfg, {"progress"} if args.no_progress else ())
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


def _positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _cmd_bench(args) -> int:
    from . import bench
    from . import prng
    from ._checks import UserError
    valid = sorted(bench.WORKLOADS) + sorted(bench.NETWORK_WORKLOADS)
    bad = [w for w in args.workloads if w not in valid]
    if bad:
        raise UserError(f"--workloads: unknown workload(s) {bad}; valid: {valid}")
    bad = [g for g in args.generators or () if g not in prng.IMPLS]
    if bad:
        raise UserError(f"--generators: unknown generator(s) {bad}; valid: {list(prng.IMPLS)}")
    width = bench.VMAP_WIDTH if args.vmap_width is None else (args.vmap_width or None)
    res = bench.run(instances=args.instances, chunk_size=args.chunk_size, vmap_width=width,
                    workloads=args.workloads, generators=args.generators or bench.GENERATORS,
                    repeat=args.repeat, counts=args.counts,
                    num_devices=args.devices, numpy_baseline=not args.no_numpy,
                    aihwkit_python=args.aihwkit_python, aihwkit_threads=args.aihwkit_threads,
                    network_instances=args.network_instances,
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
    b.add_argument("--instances", type=_positive_int, default=64,
                   help="timed instances per workload and generator (default 64)")
    b.add_argument("--repeat", type=_positive_int, default=3,
                   help="timed runs, the best is kept (default 3)")
    b.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="instances per compiled chunk (default: bench.CHUNK_SIZES per workload)")
    b.add_argument("--vmap-width", type=_vmap_width, default=None,
                   help="instances vmapped together inside a chunk, or 'none' for the whole chunk "
                        "(default: bench.VMAP_WIDTH)")
    b.add_argument("--workloads", nargs="+", default=["pcm-ideal-io", "pcm-default-io"],
                   help="MLP workloads pcm-ideal-io, pcm-default-io (default: both) and network "
                        "workloads resnet-pcm-ideal-io, resnet-pcm-default-io, "
                        "transformer-pcm-ideal-io, transformer-pcm-default-io (ResNet-20-style "
                        "CNN and transformer encoder, batch 256)")
    b.add_argument("--network-instances", type=_positive_int, default=None,
                   help="timed instances per network workload (default 8 for the ResNet, 128 "
                        "for the transformer: 32 of its chunks of 4)")
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
    prog = f"nvjax {args.cmd}"
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    _STATE["interrupted"] = False
    try:
        status = _main(args, prog)
    finally:
        for t in _PENDING:   # no re-delivery after the command has ended
            t.cancel()
        _PENDING.clear()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if status == 130 and _STATE["interrupted"] and argv is None:
        # The command line after Ctrl-C: leave without Python's finalization. JAX's threads may
        # be mid-computation (an interrupted training step or compile), and finalizing the
        # interpreter under them crashed now and then (SIGSEGV after the message, seen in the
        # test suite). Finished chunk files are already on disk (atomic writes).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if argv is None and args.cmd in ("run", "lifetime"):
        # The command line after a finished job: exit handlers run (JAX's included), then the
        # process leaves without finalizing the interpreter, which only frees memory here and
        # took ~0.5 s of the quickstart's ~9 s (destroying JAX's caches and XLA's client).
        # Every output file is closed by now (atomic writes).
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _warning_line(prog):
    """``warnings.showwarning`` for the command: a warning raised by nvjax's own code is one line
    ``nvjax <command>: warning: <message>`` on stderr; others keep Python's format."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _main(args, prog) -> int:
    try:
        from ._checks import UserError
        from ._runtime import limit_malloc_arenas
        limit_malloc_arenas()  # a few malloc arenas, before JAX starts its threads
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line(prog)
                return args.func(args)
        except UserError as e:  # config, options, paths, runs, files: one line, no traceback
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: {_INTERRUPTED[args.cmd]}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
