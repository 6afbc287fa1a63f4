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


@pytest.mark.slow
def test_readme_mitigation_example_executes():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "training" in b][0]
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["logits"].shape == (len(ns["ds"].y_test), 10)
    assert len(ns["hist"]["train_loss"]) == 2 and set(ns["pulses"]) == set(ns["c"].tiles)
