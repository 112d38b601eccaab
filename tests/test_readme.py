"""README's usage example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)  # the example writes moe.keras
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    stats = namespace["model"].get_layer("moe").routing_stats()
    assert abs(stats["expert_load"].sum() - 1.0) < 1e-5
