"""The strict configs of E-hwmodel and E-biased (their own tests: tests/test_e_hwmodel.py and
tests/test_e_biased.py)."""
import pytest

from nvjax.config import ConfigError


@pytest.mark.parametrize("script,text,needle", [
    ("e_hwmodel", "experiment: e_hwmodel\nnonidealities: []\n", "nonidealities"),
    ("e_hwmodel", "experiment: e_hwmodel\nnonidealities: [{name: a, group: analog, "
                  "device: flash}]\n", "device"),
    ("e_biased", "experiment: e_biased\ncells: [{bits: 3}]\n", "multiple"),
    ("e_biased", "experiment: e_biased\nfractions: [0.0]\n", "fractions"),
])
def test_bad_configs_raise(tmp_path, script, text, needle, load_script):
    mod = load_script(script)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        mod.load_config(str(p))
