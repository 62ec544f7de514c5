"""The execution choice (precision, memory format): kept unless clearly faster, remembered per machine, pinnable,
so that two fresh studies of one profile on one machine train with the same numerics."""

import json

from edgekd.cli import main
from edgekd.distill.execution import CACHE_ENV, MachineCache, pick

FAST = ["--set", "study.seeds=[0]", "--set", "teacher.epochs=1", "--set", "student.epochs=1", "--set", "methods={}",
        "--set", "student.precision='auto'", "--set", "student.channels_last='auto'"]


def test_the_default_is_left_only_for_a_clearly_faster_candidate():
    assert pick({"fp32": 100.0, "bf16": 108.0, "fp32-cl": 95.0}, "fp32") == "fp32"  # within the timing noise
    assert pick({"fp32": 100.0, "bf16": 125.0, "fp32-cl": 95.0}, "fp32") == "bf16"
    assert pick({"fp32": 100.0}, "fp32") == "fp32"


def test_the_machine_cache_is_keyed_by_the_machine(tmp_path, monkeypatch):
    import edgekd.distill.execution as execution

    path = tmp_path / "cache" / "execution.json"
    entry = {"choice": {"precision": "bf16", "channels_last": True, "device": "cpu"}, "images_per_s": {}}
    MachineCache(path).put("slot", entry)
    assert MachineCache(path).get("slot") == entry and MachineCache(path).get("other") is None
    monkeypatch.setattr(execution, "machine_identity", lambda: {"cpu": "another CPU"})
    assert MachineCache(path).get("slot") is None  # another machine measures its own
    monkeypatch.setenv(CACHE_ENV, "none")
    assert MachineCache().path is None and MachineCache().get("slot") is None
    path.write_text("{cut sho")
    assert MachineCache(path).get("slot") is None  # damaged: measured again, not trusted


def test_a_fresh_study_trains_with_this_machines_earlier_choice_or_a_pinned_one(tiny_profile, tmp_path, monkeypatch,
                                                                                 capsys):
    """Two fresh studies on one machine: the second reuses the first's measurement and gets the same numbers.
    `--execution plan.json` pins a study's choices where nothing is cached; a file without choices is one line."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine.json"))

    def distill(out, *extra):
        assert main(["distill", str(tiny_profile), "--out", str(tmp_path / out), *FAST, *extra]) == 0
        root = tmp_path / out / "tiny"
        plan = json.loads((root / "plan.json").read_text())
        accs = {r["run_dir"]: r.get("test_acc") for r in json.loads((root / "summary.json").read_text())}
        return plan, accs

    first, accs = distill("a")
    (slot, measured), = first["execution"].items()
    assert measured["source"] == "measured" and measured["images_per_s"]
    second, again = distill("b")
    assert second["execution"][slot]["source"].startswith("this machine's earlier measurement")
    assert second["execution"][slot]["choice"] == measured["choice"] and again == accs
    monkeypatch.setenv(CACHE_ENV, "none")
    pinned, same = distill("c", "--execution", str(tmp_path / "a" / "tiny" / "plan.json"))
    assert pinned["execution"][slot]["source"].startswith("pinned by --execution") and same == accs
    (tmp_path / "empty.json").write_text("{}")
    capsys.readouterr()
    assert main(["distill", str(tiny_profile), "--out", str(tmp_path / "d"), *FAST, "--execution",
                 str(tmp_path / "empty.json")]) != 0
    err = capsys.readouterr().err
    assert "no execution choices in it" in err and "Traceback" not in err
