"""ExecuTorch programs: `--target pte` lowers the PyTorch student to XNNPACK (FP32, and INT8 by XNNPACK's quantizer
under the same guard as the ONNX INT8 models), parity-checked against PyTorch, benched by `--backend executorch`."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from edgekd.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                reason="ExecuTorch is not installed (pip install 'edgekd[executorch]'; CI installs it)")


def test_pte_programs_match_pytorch_and_bench_on_executorch(tiny_study, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_study / "synthetic" / "base" / "kd" / "seed0", run, ignore=shutil.ignore_patterns("bundle"))
    assert main(["export", str(run), "--target", "onnx", "--target", "int8", "--target", "pte", "--calib-size", "64",
                 "--int8-max-drop", "100"]) == 0
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    fp32, int8 = manifest["models"]["pte-fp32"], manifest["models"]["pte-int8"]
    assert fp32["parity"]["ok"] and fp32["parity"]["top1_agreement"] >= 0.999 and fp32["max_batch"] == 256
    assert fp32["accuracy"] == manifest["models"]["onnx-fp32"]["accuracy"]
    assert int8["guard"]["steps"][0]["method"] == "ptq" and int8["deployed"]  # max drop 100: anything holds
    assert int8["bytes"] < fp32["bytes"]
    capsys.readouterr()
    assert main(["bench", str(run / "bundle"), "--backend", "executorch", "--batch-sizes", "1,64", "--iters", "5"]) == 0
    record = json.loads((run / "bundle" / "bench-executorch-cpu.json").read_text())
    by_model = {r["model"]: r for r in record["results"]}
    assert set(by_model) == {"pte-fp32", "pte-int8"}
    # the device scores what the export scored, on the same images
    assert by_model["pte-fp32"]["accuracy"] == fp32["accuracy"] and by_model["pte-int8"]["accuracy"] == int8["accuracy"]
    assert by_model["pte-fp32"]["runtime_settings"]["delegate"] == "XnnpackBackend"
    assert {"1", "64"} == set(by_model["pte-int8"]["latency"])


def test_a_bundle_without_programs_says_which_target_makes_them(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--backend", "executorch"]) == 2
    err = capsys.readouterr().err
    assert "has no executorch models" in err and "--target pte" in err
