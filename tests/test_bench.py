"""The step-time benchmark (ekdaa.bench) on CPU, at a tiny batch; how the command line starts."""
from __future__ import annotations

import json
import subprocess
import sys

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
    with pytest.raises(ValueError, match="--cuda-graph records CUDA graphs: use it with --device cuda"):
        bench.run(["ekdaa"], [2], steps=1, repeats=1, cuda_graph=True)


def test_ekdaa_bench_takes_the_benchmark_flags(capsys, tmp_path):
    from ekdaa.cli import main
    assert main(["bench", "--rules", "fa", "--batch-sizes", "2", "--steps", "1", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rule"] for r in out["rows"]] == ["bp", "fa"] and out["device"] == "cpu"
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(out))
    assert main(["bench", "--table", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "Device cpu, torch " in table and "| fa | 2 |" in table and "| bp | 2 |" in table
    with pytest.raises(SystemExit):
        main(["bench", "--batch-sizes", "0"])
    assert "invalid batch sizes '0'" in capsys.readouterr().err


def test_the_command_line_starts_without_plotting_or_dataset_libraries():
    code = ("import sys, ekdaa.cli; ekdaa.cli.parser(); "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
