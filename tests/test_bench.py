"""The step-time benchmark (ekdaa.bench) on CPU, at a tiny batch; how the command line starts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ekdaa import bench


def test_bench_times_every_rule_against_bp_with_a_host_bound_row():
    rows = bench.run(["ekdaa", "fa"], [2], steps=1, repeats=1)
    assert [(r["rule"], r["batch"], r["input"]) for r in rows] == [
        ("bp", 2, "3x32x32"), ("ekdaa", 2, "3x32x32"), ("fa", 2, "3x32x32"),
        ("bp", 1, "3x8x8"), ("ekdaa", 1, "3x8x8"), ("fa", 1, "3x8x8")]
    for r in rows:
        assert r["ms"] > 0 and r["images_per_s"] > 0 and r["mem_ratio_to_bp"] > 0 and r["ops"] > 0, r
        if r["rule"] == "bp":
            assert r["ratio_to_bp"] == r["mem_ratio_to_bp"] == r["ops_ratio_to_bp"] == 1
    assert len(bench.run(["fa"], [2], steps=1, repeats=1, host=False)) == 2
    with pytest.raises(ValueError, match="unknown rules"):
        bench.run(["backprop"], [2], steps=1, repeats=1)
    with pytest.raises(ValueError, match="--cuda-graph records CUDA graphs: use it with --device cuda"):
        bench.run(["ekdaa"], [2], steps=1, repeats=1, cuda_graph=True)


def test_ekdaa_bench_takes_the_benchmark_flags(capsys, tmp_path):
    from ekdaa.cli import main
    assert main(["bench", "--rules", "fa", "--batch-sizes", "2", "--steps", "1", "--repeats", "1", "--no-host",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rule"] for r in out["rows"]] == ["bp", "fa"] and out["device"] == "cpu"
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(out))
    assert main(["bench", "--table", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "Device cpu, torch " in table and "| fa | 2 | 3x32x32 |" in table and "| bp | 2 | 3x32x32 |" in table
    with pytest.raises(SystemExit):
        main(["bench", "--batch-sizes", "0"])
    assert "invalid batch sizes '0'" in capsys.readouterr().err


def test_the_command_line_starts_without_plotting_or_dataset_libraries():
    code = ("import sys, ekdaa.cli; ekdaa.cli.parser(); "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
