"""The torch-free record layer: one reader of run, bundle and bench records, their grouping and statistics,
schema versions, and `edgekd report` with PyTorch unimportable."""

import ast
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_without_torch

from edgekd.cli import main
from edgekd.errors import EdgeKDError
from edgekd.records import (
    SCHEMA_VERSION,
    BenchRecord,
    BundleRecord,
    RunRecord,
    collect,
    group_runs,
    read_benches,
    read_runs,
)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def benched_study(tiny_study, tiny_bundle, tmp_path_factory):
    """A copy of the tiny study with its scratch and KD students of seed 0 exported and benched."""
    from edgekd.bench.harness import BenchOptions, bench_bundle, save_bench
    from edgekd.export.bundle import ExportOptions, export_run

    root = tmp_path_factory.mktemp("benched") / "tiny"
    shutil.copytree(tiny_study, root, ignore=shutil.ignore_patterns("report", "bench-*.json"))
    bundles = [root / "synthetic" / "base" / "kd" / "seed0" / "bundle",
               export_run(root / "synthetic" / "base" / "scratch" / "seed0",
                          ExportOptions(targets=("onnx", "int8"), calib_size=64, int8_max_drop=100.0), log=lambda line: None)]
    for bundle in bundles:
        save_bench(bench_bundle(bundle, BenchOptions(batch_sizes=(1, 2), iters=3, warmup=1, threads=1)))
    return root


def test_report_runs_with_torch_unimportable(benched_study):
    result = run_without_torch("report", benched_study, forbid=("edgekd.distill",))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KD gain by dataset factor" in result.stdout and "report.html" in result.stdout
    out = benched_study / "report"
    blocked = {name: (out / name).read_text() for name in ("report.md", "variants.csv", "deploy.csv",
                                                           "int8_retention.csv")}
    assert "| synthetic | base | clean |" in blocked["report.md"] and "onnx-int8-cpu" in blocked["report.md"]
    deploy = blocked["deploy.csv"].splitlines()
    assert len(deploy) == 1 + 2 * 3 * 2  # (scratch, kd) x (fp32, int8 cpu, int8 trt) x batch (1, 2)

    from edgekd.report import build_report

    build_report(benched_study)  # the same numbers as with torch importable
    assert {name: (out / name).read_text() for name in blocked} == blocked


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_report_and_export_do_not_import_distill():
    edgekd = ROOT / "edgekd"
    for path in [*(edgekd / "report").glob("*.py"), *(edgekd / "export").glob("*.py"), edgekd / "records.py"]:
        assert not [n for n in _imports(path) if n.startswith("edgekd.distill")], path
    for path in [*(edgekd / "report").glob("*.py"), edgekd / "records.py"]:  # export needs torch to export
        assert not [n for n in _imports(path) if n.split(".")[0] in ("torch", "torchvision", "timm")], path


def _metrics(**extra) -> dict:
    return {"dataset": "d", "variant": "noisy", "role": "kd", "method": "kd", "seed": 1, "family": "", "model": "m",
            "test_acc": 0.8, "val_acc": 0.7, "teacher_agreement": None, "history": [{"loss": 1.0}],
            "variant_stats": {"kind": "label_noise"}, **extra}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_run_record_reads_metrics_and_round_trips(tmp_path):
    path = _write(tmp_path / "d" / "noisy" / "kd" / "seed1" / "metrics.json", _metrics())
    (record,) = read_runs(tmp_path)
    assert record == RunRecord.read(path, tmp_path)
    assert (record.kind, record.run_dir, record.schema_version, record.label) == (
        "label_noise", "d/noisy/kd/seed1", 1, "noisy")  # no schema_version in the file: version 1
    summary = record.as_dict()
    assert list(summary) == ["dataset", "variant", "role", "method", "seed", "family", "model", "test_acc",
                             "val_acc", "teacher_agreement", "kind", "run_dir", "schema_version"]
    assert summary["teacher_agreement"] is None and "history" not in summary  # present-but-None stays
    assert collect(tmp_path) == [summary] and RunRecord.from_summary(summary) == record


@pytest.mark.parametrize("kind", ["run", "bundle", "bench"])
def test_a_newer_schema_version_is_a_one_line_error(tmp_path, kind, capsys):
    newer = {"schema_version": SCHEMA_VERSION + 1}
    run = tmp_path / "d" / "base" / "kd" / "seed0"
    _write(run / "metrics.json", _metrics(**(newer if kind == "run" else {})))
    manifest = {"dataset": "d", "variant": "base", "models": {}, **(newer if kind == "bundle" else {})}
    _write(run / "bundle" / "manifest.json", manifest)
    bench = _write(run / "bundle" / "bench-ort-cpu.json", {"dataset": "d", "variant": "base", "results": [],
                                                           "options": {"backend": "ort", "device": "cpu"},
                                                           **(newer if kind == "bench" else {})})
    read = {"run": lambda: collect(tmp_path), "bundle": lambda: BundleRecord.read(run / "bundle"),
            "bench": lambda: read_benches(tmp_path)}[kind]
    with pytest.raises(EdgeKDError) as err:
        read()
    message = str(err.value)
    assert "\n" not in message and "upgrade edgekd" in message
    assert f"schema_version {SCHEMA_VERSION + 1}" in message
    assert message.startswith(str(run / {"run": "metrics.json", "bundle": "bundle/manifest.json",
                                         "bench": "bundle/bench-ort-cpu.json"}[kind]))
    if kind != "bundle":  # the report reads runs and benches: the CLI prints the same one line
        assert main(["report", str(tmp_path)]) == 2
        assert "upgrade edgekd" in capsys.readouterr().err
    else:
        assert BenchRecord.read(bench, tmp_path).run.run_dir == "d/base/kd/seed0"  # a bench knows its run


def test_groups_pair_by_seed_within_family_and_fall_back_to_the_clean_teacher():
    def rec(variant, role, seed, acc, method="", family=""):
        return {"dataset": "d", "variant": variant, "role": role, "method": method, "seed": seed, "family": family,
                "model": "m" + family, "test_acc": acc}

    records = [rec("base", "teacher", 0, 0.9), rec("base", "teacher", 0, 0.5, family="second"),
               rec("own", "teacher", 0, 0.7), rec("lonely", "teacher", 0, 0.6),
               *[rec(v, "scratch", s, 0.5 + s / 10, family=f) for v in ("noisy", "own") for f in ("", "p")
                 for s in (0, 1, 2)],
               *[rec(v, "kd", s, 0.55 + s / 10 - (0.2 if f else 0), "kd", f) for v in ("noisy", "own")
                 for f in ("", "p") for s in (0, 1)],
               RunRecord("d", "base", "teacher_cache", 0, values={"fill_s": 2.0})]
    groups = {g.label: g for g in group_runs(records)}
    assert list(groups) == ["noisy", "noisy@p", "own", "own@p", "base", "lonely"]  # teacher-only groups last
    assert groups["noisy"].teacher_acc == 0.9  # the clean data's main teacher, not the "second" one
    assert groups["own@p"].teacher_acc == 0.7  # a variant's own teacher (teacher_regime = "variant")
    assert groups["base"].cache["fill_s"] == 2.0 and groups["base"].runs == [] and groups["lonely"].runs == []
    gain, plain_gain = groups["noisy"].gain("kd"), groups["noisy@p"].gain("kd")
    assert gain.n == 2 and gain.mean == pytest.approx(0.05) and plain_gain.mean == pytest.approx(-0.15)
    scratch = groups["noisy"].scratch_acc()
    assert scratch.n == 3 and scratch.mean == pytest.approx(0.6) and groups["noisy"].methods == ["kd"]


def test_distill_summary_and_report_rows_share_the_grouping():
    from edgekd.distill.summary import summarize
    from edgekd.report.tables import variant_rows

    records = [{"dataset": "d", "variant": "base", "role": role, "method": method, "seed": seed, "model": "m",
                "test_acc": acc, "kind": "base"}
               for role, method, accs in (("scratch", "", (0.6, 0.7)), ("kd", "kd", (0.65, 0.72)))
               for seed, acc in enumerate(accs)]
    (summary,), (row,) = summarize(records), variant_rows(records)
    assert summary.methods[0].gain == row["gain"] and row["gain"].mean == pytest.approx(0.035)
    assert summary.scratch == row["scratch_acc"] and summary.methods[0].accuracy == row["kd_acc"]


def _python310() -> str | None:
    for candidate in [shutil.which("python3.10"), *sorted(glob.glob(os.path.expanduser(
            "~/.pyenv/versions/3.10*/bin/python3.10")))]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_records_import_on_python_310_without_third_party_packages():
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter here")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edgekd.records as r; "
            "assert r.Spread.of([0.1, 0.3]).n == 2; assert 'numpy' not in sys.modules")
    result = subprocess.run([python, "-I", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bootstrap_interval_beside_the_t_interval():
    """The paired bootstrap enumerates every resample of few seeds (exact, the same on every run); with 3 seeds it
    spans their range, narrower than the t-interval; one seed has none."""
    from edgekd.records import Spread

    gain = Spread.of([0.01, 0.03, 0.02])
    assert gain.bootstrap95() == (0.01, 0.03)
    assert gain.mean - gain.ci95 < 0.01 and Spread.of([0.05]).bootstrap95() is None
    many = Spread.of([0.01 * i for i in range(8)])
    lo, hi = many.bootstrap95()
    assert 0 < lo < many.mean < hi < 0.07 and many.bootstrap95() == (lo, hi)
    assert Spread(0.02, 0.01, 3) == gain  # equality is about the numbers shown, not the stored values
