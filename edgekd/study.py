"""`edgekd study`: distill -> export -> bench -> report for every dataset variant of a profile, resumably.

Each stage reads and writes run directories and skips what is already done and current: finished trainings,
bundles made from the same checkpoint, bench results newer than their bundle. Re-running a finished study
rebuilds only the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgekd.config import Profile
from edgekd.errors import EdgeKDError
from edgekd.runio import read_json


def _bundle_is_current(run: Path, wanted: set[str]) -> bool:
    from edgekd.export.bundle import sha256

    manifest = run / "bundle" / "manifest.json"
    if not manifest.is_file():
        return False
    m = read_json(manifest)
    return m["source"]["checkpoint_sha256"] == sha256(run / "model.safetensors") and wanted <= set(m["models"])


def run_full_study(profile: Profile, out: Path, reporter=None, jobs: int = 1, force: bool = False,
                   log: Callable[[str], None] = print):
    from edgekd.bench.harness import BenchOptions, bench_bundle, save_bench
    from edgekd.distill.study import run_study
    from edgekd.export.bundle import ExportOptions, export_run, find_student_runs
    from edgekd.report import build_report

    deploy = profile.deploy
    run_study(profile, out, reporter, force=force, jobs=jobs)
    root = Path(out) / profile.study.name
    targets = tuple(t for t in deploy.targets if t != "trt")
    if "trt" in deploy.targets:
        raise EdgeKDError("deploy.targets has 'trt': build TensorRT engines on the target GPU with `edgekd export "
                          "RUN_DIR --target trt`; a study exports onnx and int8")
    options = ExportOptions(targets=targets, calib_size=deploy.calib_size, calib_method=deploy.calib_method,
                            int8_presets=tuple(deploy.int8_presets), eval_limit=deploy.eval_limit)
    wanted = {"onnx-fp32"} | ({f"onnx-int8-{p}" for p in deploy.int8_presets} if "int8" in targets else set())
    bench = BenchOptions(deploy.backend, deploy.device, tuple(deploy.batch_sizes), deploy.threads, deploy.iters)
    for run in find_student_runs(root):
        label = str(run.relative_to(root))
        if not _bundle_is_current(run, wanted):
            export_run(run, options, log=lambda line, label=label: log(f"export {label}: {line}"))
        bundle = run / "bundle"
        result = bundle / f"bench-{deploy.backend}-{deploy.device}.json"
        if not result.is_file() or result.stat().st_mtime < (bundle / "manifest.json").stat().st_mtime:
            save_bench(bench_bundle(bundle, bench))
            log(f"bench {label}: done")
    return build_report(root)
