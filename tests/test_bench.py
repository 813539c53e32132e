"""The step-time benchmark (ekdaa.bench) on CPU, at a tiny batch."""
from __future__ import annotations

import pytest

from ekdaa import bench


def test_bench_times_every_rule_against_bp():
    rows = bench.run(["ekdaa", "fa"], [2], steps=1, repeats=1)
    assert [r["rule"] for r in rows] == ["bp", "ekdaa", "fa"]
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["bp"]["ratio_to_bp"] == 1 and all(r["ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert by_rule["fa"]["mem_ratio_to_bp"] == 1  # same saved activations as backprop
    assert by_rule["ekdaa"]["mem_ratio_to_bp"] > 1.3  # the error map also keeps h
    with pytest.raises(ValueError, match="unknown rules"):
        bench.run(["backprop"], [2], steps=1, repeats=1)
