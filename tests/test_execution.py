"""The execution choice (precision, memory format, torch.compile): kept unless clearly faster, remembered per
machine, pinnable, so that two fresh studies of one profile on one machine train with the same numerics."""

import json

import pytest

from edgekd.cli import main
from edgekd.distill.execution import CACHE_ENV, COMPILE_MIN_S, Execution, MachineCache, compile_choice, pick

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


TIMED = {"eager_step_s": 0.05, "for_steps": 10_000,
         "modes": {"default": {"first_compile_s": 40.0, "compile_s": 3.0, "step_s": 0.04}}}


def test_compiling_is_chosen_where_its_steps_repay_it():
    """20% faster steps repay a 3-s compile over 2,000 steps (100 s eager, 83 s compiled), not over 300 (15 vs 15 s);
    a mode within the margin, a failed one or an eager-only timing trains eagerly, and each says why."""
    assert compile_choice(TIMED, 2000) == ("default", "2000 steps: eager ~100 s, default ~83 s with its 3.0 s compile")
    assert compile_choice(TIMED, 300)[0] == ""
    close = {**TIMED, "modes": {"default": {**TIMED["modes"]["default"], "step_s": 0.047}}}
    assert compile_choice(close, 100_000)[0] == ""  # 6% faster: within the timing noise
    failed = {**TIMED, "modes": {"default": {"failed": "BackendCompilerFailed: no compiler"}}}
    assert compile_choice(failed, 100_000) == ("", "torch.compile failed (default: BackendCompilerFailed: no "
                                                   "compiler)")
    assert "too little" in compile_choice({"eager_step_s": 0.05, "for_steps": 5, "modes": {}}, 5)[1]


def test_the_plan_compiles_the_long_trainings_of_a_slot(tiny_profile, tmp_path):
    """compile = auto: one timing per (configuration, threads), the job's own steps decide (a teacher of 600 epochs
    compiles, its 2-epoch students do not), the plan keeps the timings and why; on/off need no timing; the mode is in
    the execution and, when set, in the key."""
    from test_sharing import _prepared

    from edgekd.config import load_profile
    from edgekd.distill.stage import train_key
    from edgekd.distill.train import Ranks, ranks
    from edgekd.workflows import pinned_execution

    profile = load_profile(tiny_profile, ["study.seeds=[0]", "teacher.compile='auto'", "student.compile='auto'",
                                          "teacher.epochs=600"])
    calls = []

    def measure(fn, profile, dataset, role, execution, slot, steps, num_gpus=0.0):
        calls.append((role, steps))
        return {"choice": {**TIMED, "for_steps": steps}, "source": "measured"}

    measured = {}
    jobs = _prepared(profile, tmp_path, measured=measured, measure=measure)
    assert sorted(calls) == [("scratch", 16), ("teacher", 2400)]  # the KD and scratch students: one slot, 8 steps each
    teacher, kd = jobs["synthetic/base/teacher/seed0"], jobs["synthetic/base/kd/seed0"]
    assert teacher.params["execution"]["compile"] == "default" and kd.params["execution"]["compile"] == ""
    assert train_key(profile, tmp_path, teacher)["config"]["execution"]["compile"] == "default"
    assert any("2400 steps: eager ~120 s" in why for e in measured.values() for why in e.get("decided", {}).values())
    again = _prepared(profile, tmp_path, measured=dict(measured), measure=lambda *a, **k: pytest.fail("measured"))
    assert again["synthetic/base/teacher/seed0"].params["execution"]["compile"] == "default"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"execution": measured}))
    pinned = _prepared(profile, tmp_path, measured=pinned_execution(plan), measure=lambda *a, **k: pytest.fail("x"))
    assert pinned["synthetic/base/teacher/seed0"].params["execution"]["compile"] == "default"
    with ranks(Ranks(0, 2)):  # a torchrun group: DDP is not measured compiled, so its plan trains eagerly
        group = _prepared(profile, tmp_path, measured=dict(measured))
    assert group["synthetic/base/teacher/seed0"].params["execution"]["compile"] == ""
    fixed = _prepared(load_profile(tiny_profile, ["study.seeds=[0]", "student.compile='on'"]), tmp_path,
                      measure=lambda *a, **k: pytest.fail("measured"))
    assert fixed["synthetic/base/kd/seed0"].params["execution"]["compile"] == "default"
    assert fixed["synthetic/base/teacher/seed0"].params["execution"]["compile"] == ""
    assert "compile" not in train_key(profile, tmp_path, fixed["synthetic/base/teacher/seed0"])["config"]["execution"]


def test_a_short_training_is_not_compiled_to_be_timed():
    """Too few steps to repay any compile: only the eager step is timed (no compiler runs, nothing is kept)."""
    from edgekd.distill.execution import measure_compile
    from edgekd.models import create_model

    entry = measure_compile(lambda: create_model("test_efficientnet", 4, 1, True), Execution("fp32", False, "cpu", 1),
                            (32, 1, 12, 12), 4, total_steps=10)
    assert entry["modes"] == {} and 0 < entry["eager_step_s"] * 10 < COMPILE_MIN_S


def test_compiled_trainings_give_the_same_weights_on_every_executor(tmp_path, monkeypatch):
    """student.compile = on, two students side by side (processes, each compiling in its own worker) and one after
    the other (local): the same weights bit for bit, and the run records the mode it trained with."""
    import hashlib

    from conftest import tiny_profile_with
    from safetensors.torch import load_file

    import edgekd.workflows
    from edgekd.config import load_profile
    from edgekd.workflows import distill

    monkeypatch.setattr(edgekd.workflows, "machine_threads", lambda: 2)
    path = tmp_path / "digits.toml"
    path.write_text(tiny_profile_with("[datasets.digits]\nimage_size = 12\ncrop_padding = 1", name="tiny"))
    profile = load_profile(path, ["study.seeds=[0, 1]", "study.trainings_at_once=2", "teacher.epochs=1",
                                  "student.epochs=1", "student.compile='on'", "methods={}"])
    digests = {}
    for name, options in {"auto": {"jobs": None}, "local": {"executor": "local"}}.items():
        distill(profile, tmp_path / name, **options)
        for run in sorted((tmp_path / name / "tiny").glob("digits/base/scratch/seed*")):
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["execution"]["compile"] == "default" and metrics["threads"] == 1
            weights = load_file(run / "model.safetensors")
            digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
            digests.setdefault(name, []).append(digest)
    assert digests["auto"] == digests["local"] and len(digests["local"]) == 2


def test_compiling_is_timed_against_eager_steps():
    """A training long enough: eager and compiled steps timed, with the first compile and a new process's (the
    executors test above compiled this very graph, so both may be the on-disk cache's)."""
    from edgekd.distill.execution import measure_compile
    from edgekd.models import create_model

    entry = measure_compile(lambda: create_model("test_efficientnet", 10, 1, True), Execution("fp32", False, "cpu", 1),
                            (32, 1, 12, 12), 10, total_steps=10**7, rounds=1)
    timed = entry["modes"]["default"]
    assert set(timed) == {"first_compile_s", "compile_s", "step_s"} and min(timed.values()) > 0
    assert compile_choice(entry, 10**7)[1].startswith("10000000 steps: eager")


def test_each_mode_is_timed_after_its_own_compile(monkeypatch):
    """Two modes, as on CUDA: each compiled twice and timed right after, although compiling the second clears the
    first from dynamo's cache. (On a CPU training with its threads both compile as inductor's default: the mode
    matters on CUDA only, which is not here.)"""
    import edgekd.distill.execution as execution
    from edgekd.models import create_model

    monkeypatch.setattr(execution, "compile_modes", lambda device: ["default", "reduce-overhead"])
    entry = execution.measure_compile(lambda: create_model("test_efficientnet", 10, 1, True),
                                      Execution("fp32", False, "cpu", 1), (32, 1, 12, 12), 10, total_steps=10**7,
                                      rounds=1)
    assert set(entry["modes"]) == {"default", "reduce-overhead"}
    assert all(set(m) == {"first_compile_s", "compile_s", "step_s"} for m in entry["modes"].values())
    assert compile_choice(entry, 10**7)[0] in ("", "default", "reduce-overhead")


def test_a_replan_counts_no_steps_where_even_their_bound_is_short(tiny_profile, tmp_path, monkeypatch):
    """An eager-only timing in the plan's table and trainings whose steps, bounded from the source's image count
    without loading the data, stay under COMPILE_MIN_S: eager, with no data loaded (a finished study's re-run). Where
    the bound could reach it, the steps are counted exactly."""
    from test_sharing import _prepared

    import edgekd.distill.stage as stage
    from edgekd.config import load_profile

    profile = load_profile(tiny_profile, ["study.seeds=[0]", "teacher.compile='auto'", "student.compile='auto'"])
    eager_only = {"eager_step_s": 0.01, "modes": {}}
    measured = {}
    _prepared(profile, tmp_path, measured=measured,
              measure=lambda fn, profile, dataset, role, execution, slot, steps, num_gpus=0.0:
              {"choice": {**eager_only, "for_steps": steps}})
    counted = []
    monkeypatch.setattr(stage, "planned_steps", lambda *a: counted.append(a) or 8)
    again = _prepared(profile, tmp_path, measured=dict(measured), measure=lambda *a, **k: pytest.fail("measured"))
    assert counted == [] and {j.params["execution"]["compile"] for j in again.values() if j.kind == "train"} == {""}
    slow = {slot: {**e, "choice": {**e["choice"], "eager_step_s": 1e4}} for slot, e in measured.items()}
    _prepared(profile, tmp_path, measured=slow, measure=lambda *a, **k: pytest.fail("measured"))
    assert counted  # the bound could reach the bar: counted exactly (8 steps each, fewer than timed for: no timing)
