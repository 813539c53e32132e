"""Suites: planning, running what is missing, skipping what is done, the report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ekdaa import reproduce as rp
from ekdaa.train import TrainConfig, TrainError, train

SUITE = """
[suite]
name = "tiny"
datasets = ["digits", "cifar10"]
rules = ["bp", "ekdaa"]
activations = ["tanh", "sign"]
seeds = [0, 1]
[defaults]
model = "mlp"
epochs = 1
train_subset = 100
lr = 0.05
[rules.ekdaa]
beta = 0.5
[[variants]]
label = "ekdaa-transpose"
rule = "ekdaa"
error_kernel_init = "transpose"
[[variants]]
label = "ekdaa-smooth"
rule = "ekdaa"
target_function = "smooth"
activations = ["sign"]
[[variants]]
label = "bp-ste"
rule = "bp-ste"
activations = ["sign"]
"""


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    return path


def test_plan_expands_the_protocol(suite):
    runs = rp.plan(rp.load_suite(suite))
    labels = {(r.config.dataset, r.label, r.config.activation) for r in runs}
    assert ("digits", "bp", "sign") not in labels  # bp needs f'(h): no sign row
    assert ("digits", "ekdaa", "sign") in labels and ("cifar10", "ekdaa-transpose", "tanh") in labels
    assert ("digits", "ekdaa-smooth", "sign") in labels and ("digits", "bp-ste", "sign") in labels
    assert ("digits", "ekdaa-smooth", "tanh") not in labels and ("digits", "bp-ste", "tanh") not in labels
    assert len(runs) == 2 * (3 + 4) * 2
    smooth = next(r for r in runs if r.label == "ekdaa-smooth")
    assert smooth.config.target_function == "smooth"
    ekdaa = next(r for r in runs if r.label == "ekdaa")
    assert (ekdaa.config.beta, ekdaa.config.model, ekdaa.config.epochs) == (0.5, "mlp", 1)
    assert len({r.key for r in runs}) == len(runs)
    narrowed = rp.plan(rp.load_suite(suite), datasets=["digits"], rules=["bp"], seeds=[1])
    assert [(r.label, r.config.seed) for r in narrowed] == [("bp", 1)]


def test_fields_added_later_change_identity_only_away_from_their_defaults(suite):
    run = next(r for r in rp.plan(rp.load_suite(suite)) if r.label == "ekdaa")
    old = {k: v for k, v in run.config.__dict__.items() if k in rp.FIRST_FIELDS}  # as first identified
    assert run.key == rp.hashlib.sha256(rp.json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]
    assert rp.PlannedRun("x", rp.dataclasses.replace(run.config, tau=0.5)).key != run.key


def test_reproduce_runs_missing_skips_done_and_absent_datasets(suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(rules=["bp", "ekdaa"], activations=["tanh"], data_dir=str(tmp_path / "no-data"), device="cpu",
              log=lambda s: None)
    monkeypatch.setattr("ekdaa.data.store.DataStore._download",
                        staticmethod(lambda remote, path: (_ for _ in ()).throw(
                            rp.DataError(f"cannot download {remote.url}: offline"))))
    records = rp.reproduce(suite, **kw)
    assert len(records) == 4  # digits x (bp, ekdaa) x 2 seeds; cifar10 absent
    assert "cifar10" in json.loads((tmp_path / "results" / "tiny" / "skipped.json").read_text())
    for record in records:
        assert {p.name for p in record.iterdir()} == {"config.json", "metrics.jsonl", "summary.json",
                                                       "provenance.json"}
    def train_again(cfg, **_):
        if cfg.dataset == "digits":
            pytest.fail("a finished run was trained again")
        raise rp.DataError("still offline")  # an absent dataset is tried again, and skipped again

    monkeypatch.setattr(rp, "train", train_again)
    assert sorted(rp.reproduce(suite, **kw)) == sorted(records)

    out = rp.report(tmp_path / "results", tmp_path / "RESULTS.md")
    text = out.read_text()
    assert "| bp | tanh |" in text and "| ekdaa | tanh |" in text and " ± " in text
    assert "cifar10" in text and "Skipped" in text
    assert (tmp_path / "results" / "figures" / "tiny-digits-curves.png").stat().st_size > 1000


def test_dry_run_and_no_download_look_without_training_or_loading(suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rp, "train", lambda *a, **k: pytest.fail("a dry run trained"))
    from ekdaa.data import DATASETS
    monkeypatch.setitem(DATASETS, "cifar10", lambda *a, **k: pytest.fail("cifar10 was loaded"))
    lines: list[str] = []
    kw = dict(rules=["bp"], activations=["tanh"], seeds=[0], data_dir=str(tmp_path / "no-data"), log=lines.append)
    assert rp.reproduce(suite, dry_run=True, download=False, **kw) == []
    name = rp.plan(rp.load_suite(suite), datasets=["digits"], rules=["bp"], seeds=[0], activations=["tanh"])[0].name
    assert lines[0].startswith("no results/ folder here: no run counts as done")
    assert lines[1] == f"train  digits/{name}"
    assert lines[2].startswith("skip cifar10: ") and "cifar-10-binary.tar.gz not found (downloads off)" in lines[2]
    assert lines[3] == "0 done, 1 to train (0 resuming), 1 dataset(s) skipped; no estimate for 1 (no finished run " \
                       "of their dataset and model)"
    assert not (tmp_path / "results").exists()  # nothing written, not even skipped.json
    lines.clear()  # downloads on: a host that does not answer skips the dataset, one that does is said
    monkeypatch.setattr(rp, "reachable", lambda name: False)
    rp.reproduce(suite, dry_run=True, **kw)
    assert "and its download host cannot be reached (no network?)" in lines[2]
    lines.clear()
    monkeypatch.setattr(rp, "reachable", lambda name: True)
    rp.reproduce(suite, dry_run=True, **kw)
    assert lines[2].startswith("download cifar10 first: ") and lines[3].startswith("train  cifar10/")
    record = tmp_path / "results" / "tiny" / "digits" / name  # a finished record sets the pace
    record.mkdir(parents=True)
    (record / "summary.json").write_text(json.dumps(dict(dataset="digits", model="mlp", epochs=2, seconds=7200)))
    lines.clear()
    rp.reproduce(suite, dry_run=True, download=False, **{**kw, "seeds": [0, 1]})
    assert lines[-1].startswith("1 done, 1 to train (0 resuming), 1 dataset(s) skipped; about 1.0 h for 1 of them")


def test_cli_reproduce_finds_shipped_suites_from_anywhere(tmp_path, monkeypatch, capsys):
    from ekdaa.cli import main
    monkeypatch.chdir(tmp_path)
    args = ["reproduce", "--suite", "cpu", "--datasets", "fashion-mnist", "--activations", "sign", "--dry-run",
            "--no-download", "--data-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skip fashion-mnist: " in out and "train-images-idx3-ubyte.gz" in out and "(downloads off)" in out
    assert main(["reproduce", "--suite", "nope", "--dry-run"]) == 1
    shipped = sorted(path.stem for path in (Path(rp.__file__).parent / "suites").glob("*.toml"))
    assert {"cpu", "paper", "resnet-cpu"} <= set(shipped)
    assert f"unknown suite 'nope': choose one of {', '.join(shipped)}, or give a .toml path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert f"({', '.join(shipped)}) or a .toml path" in " ".join(capsys.readouterr().out.split())


def test_interrupted_run_resumes(suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = rp.plan(rp.load_suite(suite), datasets=["digits"], rules=["bp"], seeds=[0])[0]
    work = tmp_path / "runs" / "tiny" / "digits" / run.name
    from ekdaa.train import train
    train(run.config.__class__(**{**run.config.__dict__, "out": str(work), "epochs": 1, "device": "cpu"}),
          log=lambda s: None)
    (work / "summary.json").unlink()
    seen = {}
    real = rp.train

    def spy(cfg, resume, log):
        seen["resume"] = resume
        return real(cfg, resume=resume, log=log)

    monkeypatch.setattr(rp, "train", spy)
    rp.reproduce(suite, datasets=["digits"], rules=["bp"], seeds=[0], activations=["tanh"], device="cpu",
                 log=lambda s: None)
    assert seen["resume"] is True
    shutil.rmtree(tmp_path / "results")  # stopped before its first checkpoint: started again, not refused
    for file in work.iterdir():
        if file.name != "config.json":
            file.unlink()
    lines: list[str] = []
    rp.reproduce(suite, datasets=["digits"], rules=["bp"], seeds=[0], activations=["tanh"], device="cpu",
                 log=lines.append)
    assert f"restart digits/{run.name}" in lines and (work / "summary.json").exists()


def test_report_without_runs_is_an_error(tmp_path):
    with pytest.raises(TrainError, match="no finished runs"):
        rp.report(tmp_path / "nothing", tmp_path / "RESULTS.md")
    assert not (tmp_path / "RESULTS.md").exists()


def test_report_of_run_directories_made_by_ekdaa_train(tmp_path):
    for rule in ("bp", "ekdaa"):
        train(TrainConfig(dataset="digits", model="mlp", rule=rule, epochs=1, train_subset=100, device="cpu",
                          out=str(tmp_path / "runs" / "digits" / rule)), log=lambda s: None)
    text = rp.report(tmp_path / "runs", tmp_path / "RESULTS.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| digits/")]
    assert [row.split(" | ")[:3] for row in rows] == [["| digits/bp", "bp", "digits"], ["| digits/ekdaa", "ekdaa",
                                                                                         "digits"]]
    summary = json.loads((tmp_path / "runs" / "digits" / "bp" / "summary.json").read_text())
    assert f"| {100 * summary['test_accuracy']:.2f} |" in rows[0]


def test_bad_suites(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        rp.load_suite(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[suite]\ndatasets = ["digits"]\nrules = ["backprop"]\n')
    with pytest.raises(TrainError, match="unknown rules \\['backprop'\\]"):
        rp.plan(rp.load_suite(bad))


def _record(results, label, rule, val, test, **rule_options):
    folder = results / "sweep" / "digits" / f"{label}-tanh-s0-0000000000"
    folder.mkdir(parents=True)
    summary = dict(rule=rule, activation="tanh", epochs=1, seed=0, train_accuracy=0.5, val_accuracy=val,
                   test_accuracy=test, seconds=1.0, images_per_s=10.0, rule_options=rule_options)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "provenance.json").write_text(json.dumps(dict(label=label, commit="abc", machine="m", cpus=2)))
    (folder / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, test_accuracy=test)) + "\n")


def test_report_chooses_each_rules_row_on_validation_not_test(tmp_path):
    results = tmp_path / "results"
    _record(results, "bp-lr0.1", "bp", val=0.80, test=0.95)
    _record(results, "bp-lr0.01", "bp", val=0.90, test=0.85)
    _record(results, "ekdaa-lr0.1", "ekdaa", val=0.70, test=0.70)
    _record(results, "ekdaa-beta2", "ekdaa", val=0.75, test=0.60)
    _record(results, "ekdaa-transpose", "ekdaa", val=0.95, test=0.95, error_kernel_init="transpose")
    _record(results, "fa", "fa", val=0.99, test=0.99)  # a single row: nothing to choose
    (results / "sweep" / "NOTES.md").write_text("Adam won.\n")
    text = rp.report(results, tmp_path / "RESULTS.md").read_text()
    assert "## Suite `sweep`\n\nAdam won.\n" in text
    assert "- bp (tanh): `bp-lr0.01`, validation 90.00 % (best of 2 rows)" in text
    assert "- ekdaa (tanh): `ekdaa-beta2`, validation 75.00 % (best of 2 rows)" in text
    assert "- fa (tanh)" not in text
    assert "## Robustness" not in text  # no summaries yet
    square = results / "robustness" / "square"
    square.mkdir(parents=True)
    (results / "robustness" / "NOTES.md").write_text("The claim holds nowhere.\n")
    (square / "summary.md").write_text("First 10 test images.\n\n### digits, square\n\n| rule |\n")
    text = rp.report(results, tmp_path / "RESULTS.md").read_text()
    assert ("## Robustness\n\nThe claim holds nowhere.\n\n### `robustness/square`\n\n"
            f"![accuracy under attack]({square.as_posix()}/summary.png)\n\nFirst 10 test images.\n\n"
            "#### digits, square") in text


@pytest.mark.parametrize("name", ["cpu", "paper", "sweep-cpu", "sign-cpu", "resnet-cpu"])
def test_shipped_suites_plan_and_keep_their_records(name):
    from pathlib import Path
    root = Path(__file__).parent.parent
    suite = rp.load_suite(name)
    runs = rp.plan(suite)
    assert runs and len({r.key for r in runs}) == len(runs)
    # A new config field or a changed suite must not orphan committed records (they would be rerun),
    # those of extra seeds (reproduce --seeds) included.
    records = list((root / "results" / name).glob("*/*/summary.json"))
    seeds = {json.loads(p.read_text())["seed"] for p in records} | set(suite["suite"]["seeds"])
    assert {p.parent.name for p in records} <= {r.name for r in rp.plan(suite, seeds=sorted(seeds))}


def test_output_piped_into_a_reader_that_stops_early_is_no_traceback():
    done = subprocess.run(f"{sys.executable} -m ekdaa reproduce --suite cpu --dry-run --no-download | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() and "Traceback" not in done.stderr, done.stderr
