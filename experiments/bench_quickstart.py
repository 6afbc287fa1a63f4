"""Quickstart wall time, this tree against an older checkout, alternating in one run.

``nvjax run configs/quickstart.yaml`` is what a newcomer runs first; issue 13 asks for half
its wall time. Each repeat runs, one after the other so that the machine's load affects both
alike:

* ``before``: the older checkout's CLI on its own quickstart config (``--before DIR``, e.g. a
  ``git worktree add /tmp/wt <commit>``), first run (fresh output folder, fresh compilation
  cache folder);
* ``after``: this tree's, first run (fresh output folder, fresh compilation cache);
* ``rerun``: this tree's again on a fresh output folder with the cache the ``after`` run left
  (what a user sees the second time).

Wall time is the whole process (``python -m nvjax.cli run ...``: start-up, imports, training,
compilation, sweep, files), with the progress bar off. ``results.csv`` of every run is
hashed: the variants must agree (same weights, same chips).

Run: ``python experiments/bench_quickstart.py --before /tmp/wt [--repeat 7] [--json]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tree: str, out: str, cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, NVJAX_CACHE_DIR=cache)
    cmd = [sys.executable, "-m", "nvjax.cli", "run", os.path.join(tree, "configs",
                                                                  "quickstart.yaml"),
           "--out", out, "--no-progress"]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    with open(os.path.join(out, "results.csv"), "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    return {"wall_s": wall, "results_md5": digest}


def run(before: str, repeat: int = 5, log=print) -> dict:
    times = {"before": [], "after": [], "rerun": []}
    digests = {k: set() for k in times}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            for name, tree in (("before", before), ("after", HERE)):
                cache = os.path.join(tmp, f"cache-{name}-{r}")
                got = _run(tree, os.path.join(tmp, f"out-{name}-{r}"), cache)
                times[name].append(got["wall_s"])
                digests[name].add(got["results_md5"])
                if name == "after":
                    got = _run(tree, os.path.join(tmp, f"out-rerun-{r}"), cache)
                    times["rerun"].append(got["wall_s"])
                    digests["rerun"].add(got["results_md5"])
            log(f"repeat {r + 1}/{repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                         for k, v in times.items()))
    res = {"repeat": repeat, "before_tree": os.path.abspath(before), "load_avg": os.getloadavg()}
    for k, v in times.items():
        res[k] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                  "all_s": [round(t, 3) for t in v], "results_md5": sorted(digests[k])}
    res["ratio_first_run"] = res["after"]["median_s"] / res["before"]["median_s"]
    res["ratio_rerun"] = res["rerun"]["median_s"] / res["before"]["median_s"]
    res["same_results"] = len(set().union(*digests.values())) == 1
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="an older checkout of the repository")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.before, a.repeat, log=(lambda s: None) if a.json else print)
    if not a.json:
        for k in ("before", "after", "rerun"):
            v = res[k]
            print(f"{k:7s} median {v['median_s']:.2f} s  (min {v['min_s']:.2f}, max "
                  f"{v['max_s']:.2f})  results {','.join(d[:8] for d in v['results_md5'])}")
        print(f"first run {res['ratio_first_run']:.2f}× before, rerun {res['ratio_rerun']:.2f}×; "
              f"same results: {res['same_results']}; load average {res['load_avg']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
