"""README's usage examples run as written."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_block(index, tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert len(blocks) > index, "README lost a python example"
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace = {}
    exec(compile(blocks[index], "README.md", "exec"), namespace)
    return namespace


def test_readme_sparse_moe_example_runs(tmp_path, monkeypatch):
    namespace = run_block(0, tmp_path, monkeypatch)
    stats = namespace["model"].get_layer("moe").routing_stats()
    assert abs(stats["expert_load"].sum() - 1.0) < 1e-5


def test_readme_multitask_example_runs(tmp_path, monkeypatch):
    namespace = run_block(1, tmp_path, monkeypatch)
    usage = namespace["model"].get_layer("mmoe").routing_stats()["task_expert_usage"]
    assert usage.shape == (2, 8)
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
