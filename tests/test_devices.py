"""Benches on the devices a profile names: a real sshd on 127.0.0.1 with a second, torch-free edgekd install as the
device (the Python 3.10 venv of .ci/run), and a Ray cluster whose second node has a custom resource."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_PROFILE
from sshd import Sshd, have_sshd

from edgekd.cli import main

DEVICE_PYTHON = os.environ.get("EDGEKD_PY310")
needs_sshd = pytest.mark.skipif(not have_sshd(), reason="no sshd here (apt-get install openssh-server rsync; "
                                                        ".ci/run installs them)")


def device_edgekd() -> str:
    """The device's edgekd: the torch-free 3.10 install where .ci/run made one, else this interpreter's."""
    if DEVICE_PYTHON:
        return str(Path(DEVICE_PYTHON).parent / "edgekd")
    return f"{sys.executable} -m edgekd.cli"


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "ssh").start()
    yield server
    server.stop()


def _study(tmp_path, tiny_study, devices: str) -> Path:
    """The finished tiny study copied (its trainings are current there), with a profile that deploys to `devices`."""
    shutil.copytree(tiny_study, tmp_path / "runs" / "tiny")
    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE.replace("seeds = [0, 1]", "seeds = [0]")
                       + "\n[deploy]\nbatch_sizes = [1, 8]\niters = 10\nint8_max_drop = 100.0\n" + devices)
    return profile


def _loop(server: Sshd, tmp_path: Path) -> str:
    return (f'[devices.loop]\nssh = "loop"\nssh_config = "{server.config}"\nedgekd = "{device_edgekd()}"\n'
            f'workdir = "{tmp_path / "device"}"\nretries = 1\n')


@needs_sshd
def test_a_study_benches_over_ssh_and_a_lost_connection_fails_only_that_devices_benches(
        sshd, tiny_study, tmp_path, capsys):
    profile = _study(tmp_path, tiny_study, "[devices.here]\n" + _loop(sshd, tmp_path))
    root = tmp_path / "runs" / "tiny"
    first = root / "synthetic/base/scratch/seed0/bundle/bench-ort-cpu@loop.json"

    def kill_after_the_first_remote_bench():  # the connection dies mid-study
        while not first.is_file():
            time.sleep(0.05)
        sshd.stop()

    killer = threading.Thread(target=kill_after_the_first_remote_bench, daemon=True)
    killer.start()
    code = main(["study", str(profile), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr()
    killer.join(5)
    assert code != 0
    lines = out.out.splitlines()
    text = " ".join(out.out.split())  # rich wraps long lines
    # each device said what it is before any work
    assert any(line.startswith("loop (ssh loop): ") for line in lines), out.out
    assert [line.split(":")[0] for line in lines if line.startswith("failed ")] == [
        "failed synthetic/base/kd/seed0/bench-ort-cpu@loop"], out.out
    assert ("the connection failed 2 time(s) (ssh: connect to host 127.0.0.1 port" in text
            and "finished benches are kept" in text), text
    bundle = root / "synthetic/base/kd/seed0/bundle"
    assert (bundle / "bench-ort-cpu@here.json").is_file() and not (bundle / "bench-ort-cpu@loop.json").exists()
    record = json.loads(first.read_text())
    assert record["on"]["name"] == "loop" and record["on"]["reach"] == "ssh"
    assert record["bundle"] == str(first.parent) and record["results"][0]["accuracy"] is not None
    if DEVICE_PYTHON:  # the device's own interpreter and runtime, not this machine's
        assert record["environment"]["python"].startswith("3.10") and record["key"]["config"]["on"]["runtime"]

    sshd.start()  # the device is back: the rerun finishes its benches only
    assert main(["study", str(profile), "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    done = [line for line in out.splitlines() if line.startswith("done ")]
    assert len(done) == 1 and "kd/seed0/bench-ort-cpu@loop" in done[0], out
    assert (bundle / "bench-ort-cpu@loop.json").is_file()
    report = (root / "report" / "report.md").read_text()
    assert "Benchmarked on **loop** (ssh loop" in report and "Benchmarked on **here** (local" in report
    deploy = (root / "report" / "deploy.csv").read_text()
    assert ",loop," in deploy and ",here," in deploy
    # the accuracy-latency figure has a panel per device
    from edgekd.records import select_current
    from edgekd.report.plots import latency_panels
    from edgekd.report.tables import deploy_rows

    panels = latency_panels(deploy_rows(root, select_current(root).benches))
    assert {key[1] for key in panels} == {"here (cpu)", "loop (cpu)"}


@needs_sshd
def test_bench_on_copies_only_what_changed_and_names_the_device(sshd, tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    args = ["bench", str(bundle), "--on", "loop", "--ssh-config", str(sshd.config), "--remote-edgekd",
            device_edgekd(), "--remote-workdir", str(tmp_path / "device"), "--iters", "5", "--batch-sizes", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("loop (ssh loop): ") and (bundle / "bench-ort-cpu@loop.json").is_file()
    (copy,) = (tmp_path / "device").iterdir()
    sent = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert {"manifest.json", "eval.npz", "model.onnx"} <= set(sent)
    assert main(args) == 0  # nothing changed: rsync's checksums leave every file as it was on the device
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir() if p.name in sent} == sent


@needs_sshd
def test_a_device_that_does_not_answer_is_one_line(sshd, tiny_bundle, tmp_path, capsys):
    sshd.stop()
    code = main(["bench", str(tiny_bundle), "--on", "loop", "--ssh-config", str(sshd.config)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("edgekd: error:") == 1 and "Connection refused" in err and "ssh loop" in err
    sshd.start()
    code = main(["bench", str(tiny_bundle), "--on", "loop", "--ssh-config", str(sshd.config), "--remote-edgekd",
                 "/nonexistent/edgekd"])
    err = capsys.readouterr().err
    assert code == 2 and "is not found there: pip install 'edgekd[bench]'" in err


HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'edgekd[ray]'; .ci/run installs it)")
def test_ray_places_a_devices_benches_on_the_node_with_its_resource(tiny_study, tmp_path):
    from ray.cluster_utils import Cluster

    from edgekd.config import load_profile
    from edgekd.workflows import run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    orin = cluster.add_node(num_cpus=1, resources={"orin": 1})
    try:
        profile = _study(tmp_path, tiny_study, '[devices.orin]\nray = "orin"\n')
        run(load_profile(profile), tmp_path / "runs", executor="ray", address=cluster.address, deploy=True)
        records = sorted((tmp_path / "runs" / "tiny").glob("*/*/*/seed0/bundle/bench-ort-cpu@orin.json"))
        assert len(records) == 2
        for path in records:
            on = json.loads(path.read_text())["on"]
            assert on["name"] == "orin" and on["reach"] == "ray" and on["node_id"] == orin.node_id
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_device_tables_are_checked_before_any_work(tmp_path):
    from edgekd.check import check_profile

    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE + '\n[devices.both]\nssh = "me@orin"\nray = "orin"\n'
                       '[devices.bad]\nbackends = ["tflite"]\n[devices.gpu]\nbackends = ["ort"]\ndevice = "tpu"\n'
                       '[devices."a b"]\n')
    problems = check_profile(profile, deploy=True).problems
    assert any("'devices.both' has both ssh and ray" in p for p in problems)
    assert any("'devices.bad.backends' names 'tflite', which is not a backend" in p for p in problems)
    assert any("'devices.gpu.device' must be cpu or cuda for backend ort" in p for p in problems)
    assert any("device name 'a b' cannot name a directory" in p for p in problems)


def test_a_ray_device_without_ray_is_one_line_before_any_work(tiny_profile, tmp_path, capsys):
    tiny_profile.write_text(tiny_profile.read_text() + '\n[devices.orin]\nray = "orin"\n')
    assert main(["study", str(tiny_profile), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("edgekd: error:") == 1 and "--executor ray" in err and not (tmp_path / "tiny" / "synthetic").exists()


def test_device_facts_name_what_a_bench_depends_on():
    from edgekd.bench.devices import device_facts, identity

    facts = device_facts()
    assert facts["edgekd"] and facts["cpu"] and facts["backends"]["ort"]["version"]
    assert identity(facts, "ort")["runtime"].startswith("onnxruntime ")
    assert main(["device", "--json"]) == 0


@needs_sshd
def test_without_rsync_scp_sends_only_the_files_whose_sha256_differs(sshd, tiny_bundle, tmp_path):
    from edgekd.bench.devices import SSH, Device, Ssh

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    ssh = Ssh(Device("loop", SSH, "loop", ssh_config=str(sshd.config), workdir=str(tmp_path / "device")))
    files = ["manifest.json", "eval.npz", "model.onnx"]
    where = Path(ssh.push(bundle, files, with_rsync=False))
    assert sorted(p.name for p in where.iterdir()) == sorted(files)
    sent = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    ssh.push(bundle, files, with_rsync=False)
    now = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}
    assert now["manifest.json"] != sent["manifest.json"]  # changed: sent again
    assert now["eval.npz"] == sent["eval.npz"] and now["model.onnx"] == sent["model.onnx"]  # same content: kept


def test_a_changed_device_changes_its_benches_key_only(tiny_bundle):
    from edgekd.bench.devices import device_facts, identity
    from edgekd.bench.harness import BenchOptions, bench_key
    from edgekd.records import fingerprint

    options = BenchOptions(iters=5)
    here = identity(device_facts(), "ort")
    assert fingerprint(bench_key(tiny_bundle, options)) == fingerprint(bench_key(tiny_bundle, options, here))
    other = fingerprint(bench_key(tiny_bundle, options, {**here, "runtime": "onnxruntime 1.18.0"}))
    assert other != fingerprint(bench_key(tiny_bundle, options, here))
