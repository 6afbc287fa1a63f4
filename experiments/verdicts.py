"""Gather every reproduction experiment's claim verdicts into ``experiments/README.md``.

Each experiment of DESIGN.md §11 writes, in its results folder ``experiments/results/<e>/``, a
``results.json`` whose ``claims`` field lists its claim rows (claim, paper, ours with 95 % CI,
verdict, why; ``_common.claim``) and a ``summary.md`` with the same table. This script reads the
shipped results folders and writes one table of all verdicts, each row linked to its summary and
results file, so a reader sees at once what reproduces and what does not.

    python experiments/verdicts.py            # rewrites experiments/README.md
    python experiments/verdicts.py --check    # exit 1 when experiments/README.md is out of date
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

#: The experiments of DESIGN.md §11, in its order, with the paper each reproduces.
EXPERIMENTS = (
    ("e_disturb", "E-disturb", "A: Paul, Song, Titirsha, Das, arXiv 2201.11527 (read-disturb-aware "
                               "placement)"),
    ("e_hwmodel", "E-hwmodel", "B: Han et al., Sci. China Inf. Sci. (HW-aware training + mapping "
                               "correction)"),
    ("e_swim", "E-swim", "C: Yan et al., DAC 2022 (SWIM selective write-verify)"),
    ("e_biased", "E-biased", "D: Diware et al., AICAS 2023 (mapping-aware biased training)"),
    ("e_rowprog", "E-rowprog", "E: Mackin et al., Adv. Electron. Mater. 2019 (row-parallel "
                               "programming)"),
)

HEADER = """# Reproduction experiments: verdicts

One row per claim of the source papers (DESIGN.md §11), from the shipped runs in
`experiments/results/<experiment>/`: our number with its 95 % confidence interval and a verdict
(reproduced / partly / not reproduced) with one line why. Each experiment's `summary.md` holds the
full tables and its reading; `results.json` holds every number, the config and the versions.
Rerun one with `python experiments/<experiment>.py configs/<experiment>.yaml --out DIR`
(each takes at most 30 minutes on 2 CPU cores); this file is rebuilt from the results folders by
`python experiments/verdicts.py`.

Rows are of four kinds, and only the first is tallied: a claim the paper makes; an *extension*
(a question the paper does not claim, e.g. the worst chip or another cell type); a *control* of
our own set-up; a result that holds *by construction* of the simulator (reported, not evidence).
A verdict is "reproduced" when the 95 % CI lies on the claim's side of its bound, "partly" when
the point estimate does (or the direction holds and the size does not), "not reproduced"
otherwise; each experiment's summary states its bound.

"""


def collect(results_dir: str = RESULTS):
    """``[(experiment, label, paper, claims)]`` for every experiment of :data:`EXPERIMENTS`.

    Raises:
        FileNotFoundError: an experiment has no ``results.json``.
        ValueError: its ``results.json`` has no ``claims``.
    """
    out = []
    for name, label, paper in EXPERIMENTS:
        path = os.path.join(results_dir, name, _common.RESULTS_JSON)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no {path}")
        claims = _common.read_json(path).get("claims")
        if not claims:
            raise ValueError(f"{name}: {path} has no 'claims' rows")
        out.append((name, label, paper, claims))
    return out


def kind(claim: dict) -> str:
    """The row's kind (``_common.KINDS``); rows written before kinds existed count as ``paper``
    unless their ``paper`` cell says "(our control"."""
    if "kind" in claim:
        return claim["kind"]
    return "control" if str(claim["paper"]).startswith("(our control") else "paper"


def markdown(collected) -> str:
    """The text of experiments/README.md: a count of verdicts, then one table row per claim."""
    counts = {v: 0 for v in _common.VERDICTS}
    others = {k: 0 for k in _common.KINDS if k != "paper"}
    for *_, claims in collected:
        for c in claims:
            k = kind(c)
            if k == "paper":
                counts[c["verdict"]] += 1
            else:
                others[k] += 1
    lines = [HEADER.rstrip("\n"), "",
             "Verdicts on the papers' claims: " + ", ".join(f"{n} {v}" for v, n in counts.items())
             + ". Not counted: " + ", ".join(f"{n} {k}" for k, n in others.items()) + " rows.",
             "",
             "| experiment | claim | paper | ours (95 % CI) | verdict | why |",
             "|---|---|---|---|---|---|"]
    for name, label, _, claims in collected:
        link = (f"[{label}](results/{name}/{_common.SUMMARY_MD}) "
                f"([json](results/{name}/{_common.RESULTS_JSON}))")
        for c in claims:
            row = dict(c, verdict=c["verdict"] if kind(c) == "paper"
                       else f"{c['verdict']} ({kind(c)})")
            cells = [str(row[k]).replace("|", "\\|").replace("\n", " ")
                     for k in ("claim", "paper", "ours", "verdict", "why")]
            lines.append(f"| {link} | " + " | ".join(cells) + " |")
    lines += ["", "Papers:", ""]
    lines += [f"- {label}: {paper}" for _, label, paper in EXPERIMENTS]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 (and print why) when experiments/README.md is out of date")
    args = ap.parse_args(argv)
    text = markdown(collect())
    if args.check:
        with open(README) as f:
            if f.read() != text:
                print("experiments/README.md is out of date: run python experiments/verdicts.py")
                return 1
        return 0
    _common.write_text(README, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
