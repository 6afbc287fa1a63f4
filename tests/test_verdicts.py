"""experiments/README.md gathers a verdict row for every experiment of DESIGN.md §11, and is up
to date with the shipped results folders."""
import json
import os
import re

import pytest


@pytest.fixture(scope="module")
def verdicts(load_script):
    return load_script("verdicts")


def test_readme_is_up_to_date_with_every_experiment(verdicts):
    collected = verdicts.collect()
    assert [c[0] for c in collected] == ["e_disturb", "e_hwmodel", "e_swim", "e_biased",
                                         "e_rowprog"]
    assert verdicts.main(["--check"]) == 0


def test_markdown_counts_and_links(verdicts, tmp_path):
    row = {"claim": "c", "paper": "p", "ours": "1 [0, 2]", "verdict": "partly", "why": "a|b"}
    control = dict(row, paper="(our control, not a paper claim)", verdict="reproduced")
    ext = dict(row, kind="extension", verdict="not reproduced")
    collected = [("e_x", "E-x", "X: paper", [row, dict(row, verdict="reproduced"), control,
                                             ext, dict(ext, kind="construction")])]
    text = verdicts.markdown(collected)
    assert ("Verdicts on the papers' claims: 1 reproduced, 1 partly, 0 not reproduced. Not "
            "counted: 1 extension, 1 control, 1 construction rows.") in text
    assert "| not reproduced (extension) |" in text
    assert ("| [E-x](results/e_x/summary.md) ([json](results/e_x/results.json)) | c | p | "
            "1 [0, 2] | partly | a\\|b |") in text


def test_missing_claims_are_refused(verdicts, tmp_path):
    for name, *_ in verdicts.EXPERIMENTS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"claims": [{"x": 1}]}))
    (tmp_path / "e_swim" / "results.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(ValueError, match="e_swim"):
        verdicts.collect(str(tmp_path))


def test_main_readme_quotes_the_current_tally(verdicts):
    """The README's reproduction section quotes the tally of experiments/README.md."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tally = re.search(r"Verdicts on the papers' claims: (\d+) reproduced, (\d+) partly, (\d+) "
                      r"not reproduced", verdicts.markdown(verdicts.collect())).groups()
    text = " ".join(open(os.path.join(root, "README.md"), encoding="utf-8").read().split())
    assert (f"claims: {tally[0]} reproduced, {tally[1]} partly, {tally[2]} not reproduced"
            in text)
