"""The report's numbers: one row per dataset variant (KD gain with its 95% interval) and one per deployed model."""

from __future__ import annotations

import csv
from pathlib import Path

from edgekd.records import (
    BenchRecord,
    RunRecord,
    Spread,
    group_runs,
    paired_gain,
    read_benches,
    variant_label,
)
from edgekd.roles import BASE_VARIANT, Role, pruned_source
from edgekd.runio import MANIFEST, UnreadableFile, read_json
from edgekd.targets import TARGETS, exported_target, int8_target, timing_kind

FACTOR = {"base": "clean", "fraction": "size", "labels": "labeled fraction", "per_class": "size", "imbalance": "imbalance",
          "label_noise": "label noise", "spurious": "spurious bias", "classes": "class subset",
          "corruption": "domain shift", "resolution": "domain shift"}


def _spread(runs: list[dict], key: str) -> Spread | None:
    return Spread.of([r[key] for r in runs if r.get(key) is not None])


def _mean_shifted(runs: list[dict]) -> dict[int, float]:
    """Per seed: the mean accuracy over every corruption@severity test set."""
    out = {}
    for r in runs:
        shifted = [acc for name, acc in (r.get("extra_test_acc") or {}).items() if "@" in name]
        if shifted:
            out[r["seed"]] = sum(shifted) / len(shifted)
    return out


def variant_rows(records: list[dict] | list[RunRecord]) -> list[dict]:
    """Per (dataset, variant, method): accuracies, KD gain paired by seed (mean, std, 95% CI) and bias metrics."""
    rows = []
    for g in group_runs(records):
        scratch = g.scratch
        if not scratch:
            continue
        kind = scratch[0].get("kind", BASE_VARIANT)
        for method in g.methods:
            kd = g.kd(method)
            row = {"dataset": g.dataset, "variant": g.variant, "factor": FACTOR.get(kind, kind), "kind": kind,
                   "student": kd[0]["model"], "family": g.family, "method": method, "metric": g.metric,
                   "teacher_acc": g.teacher_acc,
                   "scratch_acc": g.scratch_acc(), "kd_acc": g.kd_acc(method), "gain": g.gain(method)}
            for key in ("worst_group_acc", "tail_acc", "head_acc", "ece", "balanced_test_acc"):
                if any(r.get(key) is not None for r in kd):
                    row[f"scratch_{key}"], row[f"kd_{key}"] = _spread(scratch, key), _spread(kd, key)
            if any("@" in name for r in kd for name in (r.get("extra_test_acc") or {})):
                for who, rs in (("scratch", scratch), ("kd", kd)):
                    names = sorted({n for r in rs for n in (r.get("extra_test_acc") or {}) if "@" in n})
                    row[f"{who}_shift"] = {n: Spread.of([r["extra_test_acc"][n] for r in rs]) for n in names}
                # Averaged over corruptions within each seed first, so the spread is over seeds, like every other column.
                s_shift, k_shift = _mean_shifted(scratch), _mean_shifted(kd)
                row["scratch_shift_mean"], row["kd_shift_mean"] = (Spread.of(list(s_shift.values())),
                                                                   Spread.of(list(k_shift.values())))
                row["shift_gain"] = paired_gain(k_shift, s_shift)
            rows.append(row)
    return rows


def teacher_rows(records: list[dict] | list[RunRecord]) -> list[dict]:
    """Which teacher teaches best: per (dataset, variant, student family) whose KD methods learn from different
    teachers (`[teachers.<name>]` and a method's `teachers`), one row per method with its teacher(s), their test
    accuracy, and the KD gain paired by seed; sorted by gain. A group whose methods share one teacher has none."""
    records = [r if isinstance(r, dict) else r.as_dict() for r in records]
    named = {(r["dataset"], r["variant"], r.get("family") or "main"): r["test_acc"] for r in records
             if r["role"] == "teacher" and r.get("test_acc") is not None}

    def teacher_acc(dataset: str, variant: str, name: str) -> float | None:  # the variant's own, else the clean one's
        return named.get((dataset, variant, name), named.get((dataset, BASE_VARIANT, name)))

    rows = []
    for g in group_runs(records):
        taught = {m: tuple(g.kd(m)[0].get("teachers") or ["main"]) for m in g.methods if g.kd(m)}
        if len(set(taught.values())) < 2:
            continue
        group = []
        for method, teachers in taught.items():
            accs = [teacher_acc(g.dataset, g.variant, t) for t in teachers]
            group.append({"dataset": g.dataset, "variant": g.variant, "family": g.family, "method": method,
                          "teachers": list(teachers),
                          "teacher_acc": accs[0] if len(accs) == 1 else None,  # an ensemble's members differ
                          "teacher_accs": accs, "kd_acc": g.kd_acc(method), "gain": g.gain(method)})
        rows += sorted(group, key=lambda r: -(r["gain"].mean if r["gain"] else float("-inf")))
    return rows


def deploy_rows(study_root: Path, benches: list[BenchRecord] | None = None) -> list[dict]:
    """One row per (student run, bench file, model): accuracy and latency where it was measured; `benches`: these
    bench records only (the current ones), else every bench file of the study."""
    rows = []
    for record in read_benches(study_root) if benches is None else benches:
        run = record.run
        if run is None:  # a bundle in the study tree without its run's metrics.json: not a study result
            continue
        made = _bundle_manifest(record).get("models", {})
        for r in record.results:
            for batch, s in r["latency"].items():
                rows.append({"dataset": run.dataset, "variant": run.variant, "role": run.role,
                             "family": run.family,
                             "method": run.method, "seed": run.seed, "model": run.model,
                             "deployed": r["model"], "backend": r["backend"], "device": r["device"],
                             "device_name": record.device_name,  # [devices] name; "": the study's machine
                             # how its INT8 was made (ptq, ptq-search, qat-kd), from the bundle's manifest
                             "int8_method": made.get(r["model"], {}).get("method", "") if r["precision"] == "int8"
                             else "",
                             "precision": r["precision"], "batch": int(batch), "accuracy": r["accuracy"],
                             "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                             "throughput_ips": s["throughput_ips"], "file_mib": r["file_bytes"] / 2**20,
                             # cold start (records before edgekd measured it have none)
                             "load_ms": (r.get("cold") or {}).get("load_ms"),
                             "first_inference_ms": (r.get("cold") or {}).get("first_inference_ms"),
                             "cpu": record.environment["cpu"],
                             # records before the timing field: the targets table says what their clock was
                             "timing": r.get("timing") or timing_kind(r["backend"], r["device"]),
                             "meant_for_device": r.get("meant_for_device", r["device"] in
                                                       TARGETS.get(r["model"], exported_target("fp32")).meant_for)})
    return rows


def not_deployed_rows(benches: list[BenchRecord]) -> list[dict]:
    """Each model the export's INT8 guard refused to deploy (it changed more than deploy.int8_max_drop percent
    of FP32's answers on the validation split after every escalation step): a failed export, never a finding, with its reason."""
    rows, seen = [], set()
    for record in benches:
        run = record.run
        for model, reason in record.not_deployed.items():
            if run is None or (record.path.parent, model) in seen:
                continue
            seen.add((record.path.parent, model))
            rows.append({"dataset": run.dataset, "variant": run.variant, "family": run.family, "role": run.role,
                         "method": run.method, "seed": run.seed, "model": model, "reason": reason})
    return rows


def _bundle_manifest(record: BenchRecord) -> dict:
    try:
        return read_json(record.path.parent / MANIFEST)
    except UnreadableFile:
        return {}


def int8_compare_rows(benches: list[BenchRecord]) -> list[dict]:
    """The INT8 methods each benched bundle scored beside its deployed one (manifest `int8_compare`, made with
    deploy.int8_compare): one row per (student run, preset, method) with its accuracy on the bundle's evaluation
    images, the images every deploy row's accuracy is measured on."""
    rows, seen = [], set()
    for record in benches:
        run = record.run
        if run is None or record.path.parent in seen:
            continue
        seen.add(record.path.parent)
        for preset, methods in _bundle_manifest(record).get("int8_compare", {}).items():
            for method, info in methods.items():
                rows.append({"dataset": run.dataset, "variant": run.variant, "role": run.role, "family": run.family,
                             "method": run.method, "seed": run.seed, "deployed": int8_target(preset).key,
                             "int8_method": method, "accuracy": info["accuracy"]})
    return rows


def _stage(method: str, deployed: str) -> tuple[str, str, str] | None:
    """(source method, stage name, sort key) of a deployed model on the compression ladder, None when it is not on
    one: FP32, INT8 (per preset), pruned p% FP32, pruned p% + INT8."""
    target = TARGETS.get(deployed)
    if target is not None and target == exported_target("fp32"):
        precision = "FP32"
    elif target is not None and target.made_by == "int8":
        precision = f"INT8 {target.preset}"
    else:
        return None
    pruned = Role(method).pruned
    source, percent = (pruned[0], str(round(pruned[1] * 100))) if pruned else (method, "")
    name = f"pruned {percent}% + {precision}" if pruned and precision != "FP32" else \
        f"pruned {percent}% FP32" if pruned else precision
    return source, name, f"{int(percent or 0):03d} {precision != 'FP32'} {precision}"


def compression_ladder(deploy: list[dict], records: list[dict]) -> list[dict]:
    """Per (dataset, variant, KD method with a pruned run): each stage of its compression ladder (FP32 -> INT8 ->
    pruned -> pruned + INT8) with accuracy on the bundles' evaluation images and the KD gain over the FP32 scratch
    student on the same images, paired by seed; parameters, file size, and p50 latency per batch size. Empty when
    the study pruned nothing."""
    pruned_sources = {pruned_source(r["method"]) for r in records if pruned_source(r.get("method") or "")}
    if not pruned_sources:
        return []
    params = {(r["dataset"], r["variant"], r.get("family", ""), r["method"], r["seed"]): r.get("params")
              for r in records if r.get("role") == "kd"}
    scratch: dict[tuple, dict[int, float]] = {}
    stages: dict[tuple, dict] = {}
    for r in deploy:
        variant = (r["dataset"], r["variant"], r.get("family", ""))
        if r["role"] == "scratch" and r["deployed"] == exported_target("fp32").key:
            scratch.setdefault(variant, {})[r["seed"]] = r["accuracy"]
            continue
        stage = _stage(r["method"], r["deployed"]) if r["role"] == "kd" else None
        if stage is None or stage[0] not in pruned_sources or not r.get("meant_for_device", True):
            continue
        row = stages.setdefault((*variant, f"{r['backend']}/{r['device']}", *stage), {"acc": {}, "params": {}, "file_mib": set(), "p50_ms": {},
                                                     "deployed": r["deployed"], "model_method": r["method"]})
        row["acc"][r["seed"]] = r["accuracy"]
        row["params"][r["seed"]] = params.get((*variant, r["method"], r["seed"]))
        row["file_mib"].add(round(r["file_mib"], 3))
        row["p50_ms"].setdefault(r["batch"], []).append(r["p50_ms"])
    out = []
    for key in sorted(stages, key=lambda k: (k[:5], k[6])):
        dataset, variant, family, runner, source, name, _ = key
        row = stages[key]
        seeds_params = [v for v in row["params"].values() if v]
        out.append({"dataset": dataset, "variant": variant_label(variant, family), "method": source, "stage": name,
                    "runner": runner, "deployed": row["deployed"], "run_method": row["model_method"],
                    "accuracy": Spread.of(list(row["acc"].values())),
                    "gain": paired_gain(row["acc"], scratch.get((dataset, variant, family), {})),
                    "params": round(sum(seeds_params) / len(seeds_params)) if seeds_params else None,
                    "file_mib": max(row["file_mib"]),
                    "p50_ms": {b: sorted(v)[len(v) // 2] for b, v in sorted(row["p50_ms"].items())}})
    return out


def _flat(value):
    if isinstance(value, Spread):
        return f"{value.mean:.5f}"
    if isinstance(value, dict):
        return "; ".join(f"{k}={_flat(v)}" for k, v in value.items())
    return value


def _expand(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, Spread):
            out[key], out[f"{key}_std"], out[f"{key}_ci95"], out[f"{key}_n"] = (value.mean, value.std, value.ci95,
                                                                                value.n)
        else:
            out[key] = _flat(value)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    expanded = [_expand(row) for row in rows]
    keys: list[str] = []
    for row in expanded:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(expanded)
