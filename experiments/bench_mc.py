"""Monte Carlo throughput on the standard workloads (DESIGN.md §11); same as `nvjax bench`.

    python experiments/bench_mc.py [--json] [--instances N] [--aihwkit-python PATH]
"""
import sys

from nvjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
