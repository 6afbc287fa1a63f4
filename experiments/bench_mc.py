"""Monte Carlo throughput on the standard workloads (DESIGN.md §11); same as `nvjax bench`.

    python experiments/bench_mc.py [--json] [--instances N] [--counts 10,100,1000,10000]
                                   [--devices 1,2,4] [--aihwkit-python PATH]

Per workload: instances/s with each generator of nvjax.prng (the fastest gives the headline),
the machine's limit (matmul + normal draws) and the fraction reached, a NumPy implementation and
aihwkit in the same run, instances/s and peak memory vs instance count (fresh processes), and
scaling over forced host devices. The last line printed is one JSON object.
"""
import sys

from nvjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
