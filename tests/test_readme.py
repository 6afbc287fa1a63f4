"""The README's kernel example runs as written."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_kernel_example_executes():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["ys"].shape == (64, 16, 32)
    assert 0 < float(ns["err"]) < 0.5
    import jax.numpy as jnp
    assert bool(jnp.all(jnp.isfinite(ns["grad_w"])))


def test_quickstart_has_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    qs = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)```", qs, re.S)
    assert len(cmds) == 2
    assert "nvjax run configs/quickstart.yaml --out" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` installs and tests as the Quickstart's second command says (it may only add
    pytest options that report: ``-ra``, ``--durations``)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    qs = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    readme = re.findall(r"```bash\n(.*?)```", qs, re.S)[1].strip()
    install, test = readme.split(" && ")[-2:]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    (line,) = [ln for ln in ci.splitlines() if "pytest" in ln]
    ci_install, ci_test = line.split(" && ")
    assert ci_install.split() == install.split()[:2] + ["-q"] + install.split()[2:]
    report = [t for t in ci_test.split() if t == "-ra" or t.startswith("--durations")]
    assert [t for t in ci_test.split() if t not in report] == test.split()


@pytest.mark.slow
def test_readme_mitigation_example_executes():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "training" in b][0]
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["logits"].shape == (len(ns["ds"].y_test), 10)
    assert len(ns["hist"]["train_loss"]) == 2 and set(ns["pulses"]) == set(ns["c"].tiles)
