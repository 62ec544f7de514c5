"""The `edgekd` command: a thin layer that parses arguments, calls the Python API and prints with rich."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekd.errors import EdgeKDError
from edgekd.export.int8 import INT8_METHODS
from edgekd.export.quantize import CALIB_METHODS
from edgekd.runio import MANIFEST
from edgekd.targets import BACKENDS, EXPORT_TARGETS, ONNX_EXPORTERS

TRAINING_STACK = {"torch", "torchvision", "timm", "safetensors", "sklearn", "PIL", "onnx", "onnxscript", "matplotlib"}

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough that tables keep one line per row
    console.width = 150


class RichReporter:
    """One view of a study's jobs, for every executor: a line counting them (queued, running, done, current,
    failed), a row per running job with its wall time (and its steps, loss and images/s where the job runs in this
    process), and a line per job as it ends: done, skipped as current, run again and why, or failed and why."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.tasks = {}
        self.state: dict[str, str] = {}  # label -> queued | running
        self.counts = dict.fromkeys(("queued", "running", "done", "current", "failed"), 0)
        self.total = 0
        self.overall = None
        self.failures: dict[str, str] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def _update(self):
        c = self.counts
        status = (f"{c['queued']} queued · {c['running']} running · {c['done']} done · {c['current']} current · "
                  f"[{'red' if c['failed'] else 'default'}]{c['failed']} failed[/]")
        finished = self.total - c["queued"] - c["running"]
        if self.overall is None:
            self.overall = self.progress.add_task("jobs", total=self.total, completed=finished, status=status)
        else:
            self.progress.update(self.overall, total=self.total, completed=finished, status=status)

    def _leave(self, job):
        if job in self.tasks:
            self.progress.remove_task(self.tasks.pop(job))
        state = self.state.pop(job.label, None)
        if state:
            self.counts[state] -= 1

    def queued(self, jobs):
        for job in jobs:
            self.state[job.label] = "queued"
        self.counts["queued"] += len(jobs)
        self.total += len(jobs)
        self._update()

    def rerun(self, job, reason):
        console.print(f"[yellow]rerun[/yellow] {escape(job.label)}: {escape(reason)}", highlight=False)

    def running(self, job):
        if self.state.get(job.label) == "queued":
            self.counts["queued"] -= 1
            self.counts["running"] += 1
            self.state[job.label] = "running"
        if job not in self.tasks:
            self.tasks[job] = self.progress.add_task(escape(job.label), total=None, status="")
        self._update()

    def start(self, job, total_steps):
        if job not in self.tasks:
            self.tasks[job] = self.progress.add_task(escape(job.label), total=total_steps, status="")
        self.progress.update(self.tasks[job], total=total_steps, completed=0)

    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if job not in self.tasks:
            return
        status = "" if images_per_s is None else (f"{epoch}  {images_per_s:,.0f} img/s"
                                                  + ("" if loss is None else f"  loss {loss:.3f} (last epoch)"))
        self.progress.update(self.tasks[job], completed=completed, status=status)

    def finish(self, job, metrics, skipped):
        queued = job.label in self.state
        self._leave(job)
        if skipped:
            console.print(f"[dim]skip {escape(job.label)}: finished earlier[/dim]", highlight=False)
        else:
            console.print(f"[green]done[/green] {escape(job.label)}: {escape(_done_line(job, metrics))}",
                          highlight=False)
        if queued:
            self.counts["current" if skipped else "done"] += 1
            self._update()

    def failed(self, job, message):
        self._leave(job)
        self.failures[job.label] = message
        console.print(f"[red]failed[/red] {escape(job.label)}: {escape(message)}", highlight=False)
        self.counts["failed"] += 1
        self._update()

    def note(self, text):
        console.print(escape(text), highlight=False)

    def left_out(self, lines):
        shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
        console.print(f"[dim]left out of the summary and report, not current for this profile: {escape(shown)}[/dim]",
                      highlight=False)


def _done_line(job, m: dict) -> str:
    wall = f"{m['wall_s']:.1f} s" if isinstance(m.get("wall_s"), int | float) else ""
    kind = getattr(job, "kind", "train")
    if kind == "cache" or job.role == "teacher_cache":
        return (f"{m['teacher_forwards']:,} teacher outputs cached in {m['fill_s']:.1f} s "
                f"({m['bytes'] / 2**20:.1f} MiB)" if "bytes" in m else f"cache current, {wall}")
    if kind == "bundle":
        models = ", ".join(f"{k} {v['accuracy'] * 100:.2f}%" for k, v in m.get("models", {}).items() if "accuracy" in v)
        return f"{models}  {wall}"
    if kind == "bench":
        times = []
        for r in m.get("results", []):
            batch, s = next(iter(r["latency"].items()))
            times.append(f"{r['model']} {s['p50_ms']:.2f} ms (batch {batch})")
        return f"{', '.join(times)}  {wall}"
    if kind == "explain":
        return f"Grad-CAM of {len(m.get('models', {}))} models on {m.get('images', 0)} test images  {wall}"
    if "test_acc" in m:
        metric = "" if m.get("metric", "accuracy") == "accuracy" else f" {m['metric']}"
        return f"test{metric} {m['test_acc'] * 100:.2f}%  val {m['val_acc'] * 100:.2f}%  {wall}"
    return wall  # a kind of job this line has no summary for: its wall time


def _dataset_cell(name: str, metric: str) -> str:
    """A dataset's name in a table, with its metric where that is not top-1 accuracy (multi-label: macro AUC)."""
    return name if metric == "accuracy" else f"{name} ({metric})"


def distill_table(summaries) -> Table:
    table = Table(title="Knowledge distillation: test accuracy (%), or the dataset's metric where named; students "
                        "as mean ± std over seeds",
                  caption="KD gain = KD student - scratch student, paired by seed (points); agreement = top-1 "
                          "agreement with the teacher on test (multi-label: per image and class, present or not)")
    for col in ("dataset", "variant", "teacher", "scratch", "method", "KD student", "KD gain", "agreement", "seeds"):
        table.add_column(col, justify="left" if col in ("dataset", "variant", "method") else "right")
    for s in summaries:
        models = f"[dim]{s.teacher_model} -> {s.student_model}[/dim]"
        teacher = f"{s.teacher_acc * 100:.2f}" if s.teacher_acc is not None else "-"
        scratch = s.scratch.fmt() if s.scratch else "-"
        for i, m in enumerate(s.methods or [None]):
            gain = m.gain.fmt(signed=True) if m and m.gain else "-"
            style = "red" if m and m.gain and m.gain.mean < 0 else "green"
            dataset = _dataset_cell(s.dataset, s.metric)
            table.add_row(dataset if i == 0 else "", s.variant if i == 0 else "", teacher if i == 0 else "",
                          scratch if i == 0 else "", m.method if m else "-", m.accuracy.fmt() if m else "-",
                          f"[{style}]{gain}[/{style}]", m.agreement.fmt() if m and m.agreement else "-",
                          str(m.accuracy.n) if m else "0")
        cache = f"; teacher cache built once in {s.cache_s:.1f} s" if s.cache_s is not None else ""
        table.add_row("", models + f"[dim]{cache}[/dim]", "", "", "", "", "", "", "", end_section=True)
    return table


def _run_profile(args, deploy: bool, show) -> int:
    """What `distill` and `study` share: check the profile's whole plan, run it on the chosen executor with the
    jobs view, `show(profile, result, seconds)` what it made, then log to MLflow when asked and name the failed
    jobs (exit status 1)."""
    from edgekd.check import checked_profile
    from edgekd.pipeline.driver import JobsFailed
    from edgekd.workflows import run

    executor = _executor(args)
    profile = checked_profile(args.profile, _profile_overrides(args, args.profile), Path(args.out), args.force,
                              jobs=args.jobs, deploy=deploy)
    mlflow_uri = _mlflow_uri(args)  # before training: mlflow missing is one line, not a lost study
    start = time.perf_counter()
    result, failed = None, {}
    with RichReporter() as reporter:
        try:
            result = run(profile, Path(args.out), reporter, force=args.force, jobs=args.jobs, executor=executor,
                         address=args.address, cpus_per_job=args.cpus_per_job, deploy=deploy,
                         execution=args.execution)
        except JobsFailed as exc:
            result, failed = exc.result, exc.failed
    show(profile, result, time.perf_counter() - start)
    _track(mlflow_uri, Path(args.out) / profile.study.name)
    return _failed_jobs(failed)


def cmd_distill(args) -> int:
    from edgekd.distill.summary import summarize

    def show(profile, result, seconds):
        records = result.records if result else []
        console.print(distill_table(summarize(records)))
        console.print(f"[dim]{len(records)} runs in {Path(args.out) / profile.study.name}, {seconds:.0f} s; "
                      "summary.json written there[/dim]")

    return _run_profile(args, False, show)


def _executor(args) -> str:
    """The executor --executor, --jobs and --address ask for, or one line saying what does not fit."""
    jobs = args.jobs or 1  # below 1: the profile check names it
    executor = args.executor or ("auto" if args.jobs is None else "processes" if jobs > 1 else "local")
    if args.address and executor != "ray":
        raise EdgeKDError(f"--address is where a Ray cluster listens: add --executor ray (not {executor})")
    if args.cpus_per_job is not None and (executor != "ray" or args.cpus_per_job <= 0):
        raise EdgeKDError("--cpus-per-job is what each Ray training asks for, above 0: use it with --executor ray "
                          "(elsewhere set study.threads)")
    if jobs > 1 and executor != "processes":
        raise EdgeKDError(f"--jobs {args.jobs} sets the processes of --executor processes; --executor {executor} "
                          + ("runs one job at a time" if executor == "local" else "runs as many jobs at once as "
                             "the cluster's CPUs allow"))
    if executor == "ray":
        from edgekd.pipeline.executors import RAY_INSTALL

        if importlib.util.find_spec("ray") is None:
            raise EdgeKDError(f"--executor ray needs Ray, which is not installed here: {RAY_INSTALL}")
    return executor


def _failed_jobs(failed: dict[str, str]) -> int:
    """Exit status 1 and a line per failed job (the others finished, and a rerun retries only these)."""
    if not failed:
        return 0
    err_console.print(f"[bold red]edgekd: {len(failed)} job(s) failed[/bold red] (the jobs that did not need them "
                      "finished; run the same command again to retry them):", highlight=False)
    for label, why in failed.items():
        err_console.print(f"  {escape(label)}: {escape(why)}", soft_wrap=True, highlight=False)
    return 1


def _profile_overrides(args, profile_path: str) -> list[str]:
    """--set, and --data-dir / --download as overrides of every dataset of the profile."""
    overrides = list(args.set or [])
    if getattr(args, "data_dir", None):
        overrides += [f"datasets.{name}.data_dir={args.data_dir!r}" for name in _dataset_names(profile_path)]
    if getattr(args, "download", False):
        overrides += [f"datasets.{name}.download=true" for name in _dataset_names(profile_path)]
    return overrides


def _dataset_names(profile_path: str) -> list[str]:
    from edgekd.config import parse_profile, read_profile_data

    try:
        data = read_profile_data(profile_path)
    except EdgeKDError:  # the plan check reports what is wrong with the file, with everything else
        return []
    return list(parse_profile(data)[0].datasets)


def cmd_datasets(args) -> int:
    from edgekd.config import DatasetConfig
    from edgekd.data.sources import SOURCES

    table = Table(title="Data sources")
    for col in ("name", "what", "looks in"):
        table.add_column(col)
    for name, source in SOURCES.items():
        cfg = DatasetConfig(source=name, data_dir=args.data_dir or "")
        paths = source.search_paths(cfg)
        table.add_row(name, source.description, "\n".join(str(p) for p in paths) or "data_dir / --data-dir")
    console.print(table)
    return 0


def cmd_env(args) -> int:
    from edgekd.envinfo import environment

    info = environment()
    table = Table(title="edgekd environment", show_header=False)
    for key, value in info.items():
        if key == "packages":
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        table.add_row(key, str(value))
    console.print(table)
    return 0


def cmd_export(args) -> int:
    from edgekd.check import export_problems, require
    from edgekd.distill.qat import qat_trainer
    from edgekd.export.bundle import ExportOptions, export_run, find_student_runs

    targets = list(args.target or ["onnx"])
    compare = tuple(m for m in args.int8_compare.split(",") if m)
    if (args.int8_sensitivity or args.int8_method != "ptq" or compare) and "int8" not in targets:
        targets.append("int8")  # asking for the analysis or a method is asking for INT8
    if args.qat_epochs < 1 or args.qat_lr < 0:
        raise EdgeKDError("--qat-epochs must be at least 1 and --qat-lr at least 0 (0: the student's lr / 100)")
    if args.int8_max_drop < 0:
        raise EdgeKDError("--int8-max-drop is a percentage and cannot be negative, e.g. 1.0")
    escalate = tuple(m for m in args.int8_escalation.split(",") if m)
    for option, methods in (("--int8-compare", compare), ("--int8-escalation", escalate)):
        unknown = [m for m in methods if m not in INT8_METHODS]
        if unknown:
            raise EdgeKDError(f"{option} {','.join(unknown)!r}: use some of {', '.join(INT8_METHODS)}, e.g. ptq,qat-kd")
    options = ExportOptions(targets=tuple(targets), calib_size=args.calib_size,
                            calib_method=args.calib_method, int8_presets=tuple(args.int8_preset.split(",")),
                            fp16=args.fp16, eval_limit=args.eval_limit, int8_method=args.int8_method,
                            int8_max_drop=args.int8_max_drop, int8_escalation=escalate,
                            int8_sensitivity=args.int8_sensitivity,
                            qat_epochs=args.qat_epochs, qat_lr=args.qat_lr,
                            int8_compare=compare, onnx_exporter=args.onnx_exporter)
    require(export_problems(Path(args.run_dir), options.targets, options.int8_presets, options.calib_size,
                            options.eval_limit))
    runs = find_student_runs(Path(args.run_dir))
    table = Table(title="Exported bundles")
    for col in ("run", "model", "precision", "accuracy", "vs PyTorch / FP32", "MiB"):
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    for run in runs:
        label = str(run.relative_to(args.run_dir)) if run != Path(args.run_dir) else run.name
        with console.status(f"exporting {label}"):
            bundle = export_run(run, options, log=lambda line, label=label: console.print(f"[dim]{label}: {line}"),
                                qat=qat_trainer(options))
        from edgekd.runio import read_json

        for key, m in read_json(bundle / MANIFEST)["models"].items():
            check = (f"Δ {m['parity']['max_abs_logit_diff']:.1e}" if "parity" in m else
                     f"{m['accuracy_change_vs_fp32'] * 100:+.2f} pts" if "accuracy_change_vs_fp32" in m else "")
            acc = f"{m['accuracy'] * 100:.2f}" if "accuracy" in m else "-"
            name = key if m.get("deployed", True) else f"[red]{key} (not deployed)[/red]"
            table.add_row(label, name, m["precision"], acc, check, f"{m['bytes'] / 2**20:.2f}")
        manifest = read_json(bundle / MANIFEST)
        for preset, record in manifest.get("int8_sensitivity", {}).items():
            from edgekd.export.sensitivity import sensitivity_table

            console.print(sensitivity_table(record, f"{label}: INT8 sensitivity ({preset} preset), worst node groups"))
        for key, m in manifest["models"].items():
            if m.get("method") == "ptq-search":
                mp, c = m["mixed_precision"], m["calibration"]
                console.print(f"[dim]{label} {key}: calibration {c['method']} x {c['images']} ({c['placement']} Q/DQ), "
                              f"{mp['k']} float group(s){': ' + ', '.join(mp['float_groups']) if mp['k'] else ''}; "
                              f"validation drop {m['validation']['int8']['drop_pts']:+.2f} pts"
                              f"{'' if mp['reached_target'] else ' (target missed)'}[/dim]")
    console.print(table)
    return 0


def cmd_bench(args) -> int:
    from edgekd.bench.harness import BenchOptions, bench_bundle, save_bench

    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes", "1,8,64")
    threads = (0,) if args.threads in ("", "0") else _int_list(args.threads, "--threads", "1,2,4")
    options = BenchOptions(args.backend, args.device, batch_sizes, threads[0], args.iters, args.duration,
                           args.warmup, tuple(args.model or ()))
    if args.on:
        return _bench_on(args, options)
    _check_bundles(args.bundle, args.backend)
    if len(threads) > 1:
        return _thread_sweep(args.bundle, options, threads)
    if args.json:  # what `edgekd bench --on` reads back from a device: the record, and nothing else on stdout
        if len(args.bundle) != 1:
            raise EdgeKDError("--json benches one bundle: give one bundle directory")
        record = bench_bundle(Path(args.bundle[0]), options)
        if args.out:
            save_bench(record, Path(args.out))
        sys.stdout.write(json.dumps(record) + "\n")
        return 0
    for bundle in args.bundle:
        with console.status(f"bench {bundle}") as status:
            record = bench_bundle(Path(bundle), options, progress=lambda text: status.update(f"bench {text}"))
        path = save_bench(record, Path(args.out) if args.out and len(args.bundle) == 1 else None)
        console.print(bench_table(record))
        for key, why in record.get("not_deployed", {}).items():
            console.print(f"[yellow]skipped {escape(key)}: not deployed ({escape(why)}); --model {escape(key)} "
                          "benches it anyway[/yellow]", highlight=False)
        console.print(f"[dim]written {path}[/dim]")
    return 0


def _bench_on(args, options) -> int:
    """`edgekd bench BUNDLE... --on HOST`: the device checked first (one line), then each bundle copied there,
    benched by the device's edgekd, and its record brought back as bench-<backend>-<device>@<name>.json."""
    from edgekd.bench.devices import SSH, Device, Ssh, bench_over_ssh, device_problem, facts_line
    from edgekd.bench.harness import save_bench

    if len(str(args.threads).split(",")) > 1:
        raise EdgeKDError("--on benches one thread count: give --threads N (run the sweep on the device itself)")
    _check_bundles(args.bundle)
    name = args.name or args.on.rpartition("@")[2].split(":")[0]
    device = Device(name, SSH, args.on, (options.backend,), options.device, args.ssh_config or "",
                    args.remote_edgekd, args.remote_workdir)
    ssh = Ssh(device)
    with console.status(f"asking {device.title} what it is"):
        facts = ssh.facts()
    console.print(facts_line(device, facts), highlight=False)
    problem = device_problem(device, facts)
    if problem:
        raise EdgeKDError(problem)
    for bundle in args.bundle:
        with console.status(f"bench {bundle} on {device.title}"):
            record = bench_over_ssh(device, Path(bundle), options, facts, ssh)
        path = save_bench(record)
        console.print(bench_table(record))
        console.print(f"[dim]written {path}[/dim]")
    return 0


def cmd_device(args) -> int:
    """`edgekd device`: this machine as a bench device (what `--on` and [devices] ask a device before any work)."""
    from edgekd.bench.devices import Device, device_facts, facts_line

    facts = device_facts()
    if args.json:
        sys.stdout.write(json.dumps(facts) + "\n")
        return 0
    console.print(facts_line(Device(), facts), highlight=False)
    for name, info in facts["backends"].items():
        console.print(f"  {name}: " + (info["version"] and f"[green]{info['version']}[/green]"
                                       or f"[yellow]not installed[/yellow]: {escape(info['missing'] or '')}"))
    return 0


def _thread_sweep(bundles: list[str], options, threads: tuple[int, ...]) -> int:
    """One bench per thread count, side by side in one run (thread settings are the commonest cause of unstable
    CPU figures); each record goes to bundle/threads/, apart from the bench files the report reads."""
    from dataclasses import replace

    from edgekd.bench.harness import bench_bundle, save_bench

    for bundle in bundles:
        records = {}
        for n in threads:
            with console.status(f"bench {bundle}, {n} threads") as status:
                records[n] = bench_bundle(Path(bundle), replace(options, threads=n),
                                          progress=lambda text, n=n: status.update(f"bench {text}, {n} threads"))
            save_bench(records[n], Path(bundle) / "threads" / f"bench-{options.backend}-{options.device}-t{n}.json")
        console.print(thread_sweep_table(records))
        console.print(f"[dim]written {Path(bundle) / 'threads'}[/dim]")
    return 0


def thread_sweep_table(records: dict[int, dict]) -> Table:
    first = next(iter(records.values()))
    table = Table(title=f"{first['dataset']}/{first['variant']}: p50 ms (images/s) by intra-op threads on "
                        f"{first['environment']['cpu']} ({first['environment'].get('cores', '?')} cores)",
                  caption="each thread count benched in turn in this one run; compare within this table only")
    table.add_column("model")
    table.add_column("batch", justify="right")
    for n in records:
        table.add_column(f"{n} threads", justify="right")
    for i, r in enumerate(first["results"]):
        for batch in r["latency"]:
            cells = []
            for record in records.values():
                s = record["results"][i]["latency"][batch]
                cells.append(f"{s['p50_ms']:.3f} ({s['throughput_ips']:,.0f})")
            table.add_row(r["model"], batch, *cells)
    return table


def _int_list(text: str, option: str, example: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise EdgeKDError(f"{option} {text!r} must be integers separated by commas, e.g. {example}") from None
    if any(b < 1 for b in values):
        raise EdgeKDError(f"{option} values must be at least 1, e.g. {example}")
    return values


def _check_bundles(bundles: list[str], backend: str | None = None) -> None:
    """Every bundle whole and the backend's runtime installed, all problems at once, before the first model."""
    from edgekd.check import bundle_problems, require
    from edgekd.targets import missing_for

    problems = [p for b in bundles for p in bundle_problems(Path(b))]
    fix = missing_for(backend) if backend in BACKENDS else None  # an unknown one: the runner registry names them
    if fix:
        problems.append(f"--backend {backend} needs {BACKENDS[backend].module}, which is not installed: {fix}")
    require(problems)


def cmd_build(args) -> int:
    from edgekd.export.tensorrt_build import build_engines

    batch_range = _int_list(args.batch_range, "--batch-range", "1,64,256")
    if len(batch_range) != 3:
        raise EdgeKDError(f"--batch-range {args.batch_range!r} needs three sizes min,opt,max, e.g. 1,64,256")
    if args.workspace_mb < 1:
        raise EdgeKDError("--workspace-mb must be at least 1, e.g. 1024")
    precisions = ("fp32", *(["fp16"] if args.fp16 else []), *(["int8"] if args.int8 else []))
    _check_bundles(args.bundle)  # TensorRT itself: build_engines checks it after the sources, naming the fix
    table = Table(title="TensorRT engines")
    for col in ("bundle", "engine", "from", "GPU", "TensorRT", "MiB", "build s"):
        table.add_column(col, justify="right" if col in ("MiB", "build s") else "left")
    for bundle in args.bundle:
        with console.status(f"building engines for {bundle}") as status:
            built = build_engines(Path(bundle), precisions, batch_range, args.workspace_mb, args.force,
                                  log=lambda line, b=bundle, s=status: s.update(f"{b}: {escape(line)}"))
        for key, e in built.items():
            table.add_row(bundle, key, e["source"], e["gpu"], e["tensorrt"], f"{e['bytes'] / 2**20:.2f}",
                          f"{e['build_s']:.1f}" if "build_s" in e else "-")
    console.print(table)
    return 0


def bench_table(record: dict) -> Table:
    env = record["environment"]
    gpu = (env.get("gpu") or {}).get("gpu")  # None where nvidia-smi failed (its line is in the record)
    where = gpu if record["options"]["device"] == "cuda" and gpu else env["cpu"]
    student = record["student"]
    size = (f" ({student['params'] / 1e6:.2f}M parameters, {student['macs_per_image'] / 1e6:.2f}M MACs/image)"
            if "macs_per_image" in student else "")
    calls = max((r.get("calls_per_sample", 1) for r in record["results"]), default=1)
    table = Table(title=f"{record['dataset']}/{record['variant']}: {student['model']}{size} on {where}",
                  caption=f"warm latency in ms over {record['eval_samples']} eval images' batches, n = samples; "
                          f"cold: opening the model (load) and its first inference; threads {env['threads']}; "
                          "timing host_wall = host clock around the call, device_events = CUDA events around "
                          f"the GPU work ({calls} enqueues per sample); * = not made for this device, or computed "
                          "there in float with its Q/DQ simulated (the record's 'computes')")
    for col in ("model", "timing", "load ms", "1st ms", "batch", "accuracy %", "n", "p50", "p90", "p99", "mean ± std",
                "images/s", "MiB file", "MiB RSS+"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in record["results"]:
        cold = r.get("cold") or {}
        for i, (batch, s) in enumerate(r["latency"].items()):
            name = r["model"] + ("" if r.get("meant_for_device", True) else " *")
            first = i == 0 and cold
            table.add_row(name if i == 0 else "", str(r.get("timing", "")) if i == 0 else "",
                          f"{cold['load_ms']:.1f}" if first else "", f"{cold['first_inference_ms']:.2f}" if first else "",
                          batch, f"{r['accuracy'] * 100:.2f}" if i == 0 else "", str(s.get("iterations", "")),
                          f"{s['p50_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}",
                          f"{s['mean_ms']:.3f} ± {s['std_ms']:.3f}", f"{s['throughput_ips']:,.0f}",
                          f"{r['file_bytes'] / 2**20:.2f}" if i == 0 else "",
                          f"{r['peak_rss_increase_mib']:.1f}" if i == 0 else "", end_section=i == len(r["latency"]) - 1)
    return table


def report_table(report) -> Table:
    table = Table(title=f"KD gain by dataset factor: {report.root.name}",
                  caption="test accuracy % (or the dataset's metric where named), mean ± std over seeds; gain paired "
                          "by seed with its 95% interval")
    for col in ("dataset", "variant", "factor", "student", "method", "teacher", "scratch", "KD", "KD gain [95% CI]"):
        table.add_column(col, justify="left" if col in ("dataset", "variant", "factor", "student", "method") else "right")
    for r in report.variants:
        g = r["gain"]
        style = "red" if g and g.mean < 0 else "green"
        gain = f"[{style}]{g.mean * 100:+.2f} [±{g.ci95 * 100:.2f}][/{style}]" if g else "-"
        table.add_row(_dataset_cell(r["dataset"], r.get("metric", "accuracy")), r["variant"], r["factor"], r["student"], r["method"],
                      f"{r['teacher_acc'] * 100:.2f}" if r["teacher_acc"] is not None else "-",
                      r["scratch_acc"].fmt() if r["scratch_acc"] else "-", r["kd_acc"].fmt() if r["kd_acc"] else "-",
                      gain)
    for r in report.retention:
        g8 = r["gain_int8"]  # None when the guard refused an INT8 model on every seed: no pair to compare
        int8 = f"{g8.mean * 100:+.2f}" if g8 else "no deployed pair"
        refused = f", {r['not_deployed']} seed(s) not deployed" if r.get("not_deployed") else ""
        table.add_row(r["dataset"], r["variant"], f"after {r['deployed']}", "", r["method"], "", "", "",
                      f"{int8} (FP32 {r['gain_fp32'].mean * 100:+.2f}{refused})")
    return table


def cmd_study(args) -> int:
    def show(profile, result, seconds):
        if result is not None and result.report is not None:
            console.print(report_table(result.report))
            console.print(f"report: {result.report.files['html']}  ({seconds:.0f} s)")

    return _run_profile(args, True, show)


def cmd_check(args) -> int:
    from edgekd.check import check_profile

    failed = 0
    for path in args.profile:
        checked = check_profile(path, _profile_overrides(args, path), Path(args.out), deploy=True)
        if checked.problems:
            failed += 1
            prefix = f"{path}: " if len(args.profile) > 1 else ""
            _error("\n".join(prefix + problem for problem in checked.problems))
        else:
            console.print(f"ok {escape(path)}: {escape(checked.summary())}", soft_wrap=True, highlight=False)
    return 2 if failed else 0


def cmd_report(args) -> int:
    from edgekd.report import build_report

    report = build_report(Path(args.runs_dir))
    console.print(report_table(report))
    console.print(f"report: {report.files['html']}, {report.files['md']}, CSV files beside them")
    return 0


def _mlflow_uri(args) -> str | None:
    from edgekd.tracking import tracking_uri

    return tracking_uri(args.mlflow, note=lambda line: console.print(f"[yellow]{escape(line)}[/yellow]"))


def _track(uri: str | None, study_root: Path) -> None:
    """The study's records, also in MLflow (edgekd/tracking.py), when a tracking URI was given."""
    if uri is None:
        return
    from edgekd.tracking import sync_study

    try:
        sync_study(study_root, uri, log=lambda line: console.print(f"[dim]{escape(line)}[/dim]"))
    except Exception as exc:  # a server down, a bad URI: the runs are kept; say what failed, in one line
        raise EdgeKDError(f"logging to MLflow at {uri} failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                          "the run directories are complete: run the same command again to log them") from None


MLFLOW_HELP = "also log runs (params, per-epoch metrics, bundles) to this MLflow tracking URI (or MLFLOW_TRACKING_URI)"


def _profile_options(p: argparse.ArgumentParser) -> None:
    """What `distill` and `study` share: a profile, where its runs go, overrides, and where the jobs run."""
    p.add_argument("profile", help="study profile (TOML), e.g. profiles/quickstart.toml")
    p.add_argument("--out", default="runs", help="runs directory (default: runs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile key, e.g. student.epochs=3")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.add_argument("--execution", metavar="FILE", type=Path,
                   help="train with the precision and memory format a JSON file records (a study's plan.json, or "
                        "this machine's execution cache) instead of measuring: the same numerics as that study")
    _executor_options(p)


def _executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["auto", "local", "processes", "ray"],
                   help="where jobs run: auto (the default: as many trainings side by side as measured fastest on "
                        "this machine, study.trainings_at_once), local (one at a time in this process), processes "
                        "(--jobs N on this machine), ray (a Ray task per job; see --address). Each trains with the "
                        "same threads, so the same numbers")
    p.add_argument("--jobs", type=int, default=None, help="with --executor processes (implied by N > 1): jobs run "
                                                          "in this many processes; 1: --executor local")
    p.add_argument("--address", help="with --executor ray: a running cluster (auto, or ray://host:10001) instead of a "
                                     "local Ray started for the run; --out must be on storage every node mounts")
    p.add_argument("--cpus-per-job", type=float, metavar="N",
                   help="with --executor ray: CPUs each training asks Ray for (default: its threads, the plan's "
                        "choice); it trains with the plan's threads either way, so the same float results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekd", description="Does knowledge distillation pay off on my "
                                     "dataset, on my edge device?")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="train teacher, scratch and KD students over seeds; report the KD gain")
    _profile_options(p)
    p.add_argument("--data-dir", help="where dataset files live (overrides the profile)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("study", help="distill, export, bench and report every dataset variant of a profile")
    _profile_options(p)
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("report", help="tables and plots of a study: report.md, report.html, CSV")
    p.add_argument("runs_dir", help="a study directory, e.g. runs/quickstart")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="turn students into ONNX / INT8 / TensorRT bundles, checked against PyTorch")
    p.add_argument("run_dir", help="a student run directory, or a study directory (all its students)")
    p.add_argument("--target", action="append", choices=EXPORT_TARGETS, help="repeatable; default onnx")
    p.add_argument("--calib-size", type=int, default=512, help="training images used to calibrate INT8")
    p.add_argument("--calib-method", default="minmax", choices=CALIB_METHODS)
    p.add_argument("--int8-preset", default="cpu,trt", help="cpu (ORT on CPUs), trt (TensorRT Q/DQ), or both")
    p.add_argument("--fp16", action="store_true", help="also model.fp16.onnx (and with --target trt an FP16 engine)")
    p.add_argument("--eval-limit", type=int, default=0, help="cap the bundle's eval set (0 = whole test split)")
    p.add_argument("--int8-method", default="ptq", choices=INT8_METHODS,
                   help="ptq: one calibration, all INT8; ptq-search: calibration and float node groups chosen on the "
                        "validation split; qat-kd: quantization-aware fine-tune against the run's own teacher and "
                        "losses, learned scales exported (implies --target int8)")
    p.add_argument("--int8-compare", default="", metavar="METHODS",
                   help="other INT8 methods (comma-separated, e.g. ptq,qat-kd) made beside --int8-method, scored on "
                        "the evaluation images and recorded in the manifest, not kept: the report compares them")
    p.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default=ONNX_EXPORTERS[0],
                   help="torch's ONNX exporter: torchscript (+ onnxscript's optimizer; the same graph, much faster "
                        "here) or dynamo (for a model TorchScript cannot trace)")
    p.add_argument("--qat-epochs", type=int, default=2, help="qat-kd: fine-tune epochs (default 2)")
    p.add_argument("--qat-lr", type=float, default=0.0, help="qat-kd: learning rate (default: the student's / 100)")
    p.add_argument("--int8-max-drop", type=float, default=1.0,
                   help="the INT8 guard: the most of FP32's answers a deployed INT8 model may change on the "
                        "validation split, in percent (default 1.0; it bounds the points lost); ptq-search's target")
    p.add_argument("--int8-escalation", default="ptq-search", metavar="METHODS",
                   help="INT8 methods tried in turn when a model fails the guard (default ptq-search; add qat-kd to "
                        "train); if none holds, the model is kept but marked not deployed, and bench skips it")
    p.add_argument("--int8-sensitivity", action="store_true",
                   help="per node group INT8 sensitivity on the validation split, in the manifest and printed "
                        "(implies --target int8)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="accuracy, latency, throughput and memory of exported bundles on this device")
    p.add_argument("bundle", nargs="+", help="bundle directories (<run>/bundle) made by edgekd export")
    p.add_argument("--backend", default="ort", help="; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--threads", default="0", help="intra-op threads (0 = runtime default); several (1,2,4) bench "
                                                  "each in turn and print them side by side")
    p.add_argument("--iters", type=int, default=200, help="timed iterations per batch size")
    p.add_argument("--duration", type=float, help="seconds per batch size instead of --iters")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--model", action="append", help="only these manifest models (repeatable), e.g. onnx-int8-cpu")
    p.add_argument("--out", help="where to write bench.json (default: in the bundle)")
    p.add_argument("--json", action="store_true", help="print the bench record as JSON on stdout, nothing else "
                                                       "(written to a file only with --out)")
    p.add_argument("--on", metavar="HOST", help="bench on a device over SSH (user@host or a Host of ~/.ssh/config): "
                                                "copies each bundle there, runs its edgekd, brings the record back")
    p.add_argument("--name", help="with --on: the device's name in the record's file name (default: the host)")
    p.add_argument("--ssh-config", help="with --on: an ssh config file (ssh -F) instead of ~/.ssh/config")
    p.add_argument("--remote-edgekd", default="edgekd", help="with --on: the edgekd command on the device")
    p.add_argument("--remote-workdir", default=".cache/edgekd/bundles",
                   help="with --on: where bundles are copied on the device (under its home, or absolute)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("device", help="this machine as a bench device: identity and the backends it can run")
    p.add_argument("--json", action="store_true", help="as JSON (what a study asks a device over SSH)")
    p.set_defaults(func=cmd_device)
    p = sub.add_parser("build", help="TensorRT engines from a bundle's ONNX files, on this GPU (no PyTorch needed)")
    p.add_argument("bundle", nargs="+", help="bundle directories (<run>/bundle) made by edgekd export")
    p.add_argument("--fp16", action="store_true", help="also an FP16 engine, from model.fp16.onnx")
    p.add_argument("--int8", action="store_true", help="also an INT8 engine, from model.int8-trt.onnx (Q/DQ)")
    p.add_argument("--batch-range", default="1,64,256", help="min,opt,max batch of the engine's profile")
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace")
    p.add_argument("--force", action="store_true", help="rebuild engines that are current")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("check", help="check a profile's whole plan in a second (models, losses, data, paths), "
                                     "training nothing; distill and study run it first")
    p.add_argument("profile", nargs="+", help="study profiles (TOML), e.g. profiles/*.toml")
    p.add_argument("--out", default="runs", help="the runs directory distill and study would use (default: runs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile key")
    p.add_argument("--data-dir", help="where dataset files live (overrides the profile)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("datasets", help="list data sources and where each looks for its files")
    p.add_argument("--data-dir", help="show where a data directory would be searched")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("env", help="versions, device and threads")
    p.set_defaults(func=cmd_env)
    return parser


def _error(message: str) -> int:
    for line in message.splitlines() or [""]:  # a plan check reports every problem, each on its own line
        err_console.print(f"[bold red]edgekd: error:[/bold red] {escape(line)}", soft_wrap=True, highlight=False)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeKDError as exc:
        return _error(str(exc))
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in TRAINING_STACK:
            return _error(f"`edgekd {args.command}` needs {top}, which is not installed: pip install "
                          "'edgekd[train]' (bench alone needs only 'edgekd[bench]')")
        if top == "onnxruntime":
            return _error("ONNX Runtime is not installed: pip install 'edgekd[bench]'")
        raise
    except KeyboardInterrupt:
        err_console.print("edgekd: interrupted; run the same command again to continue where it stopped")
        return 130
    except OSError as exc:
        if exc.filename is None:  # not about a file: a bug, whose traceback is the report
            raise
        # A full disk, a read-only or vanished directory: what happened where, and what to do.
        return _error(f"cannot write or read {exc.filename}: {exc.strerror or exc}: free space there, fix its "
                      "permissions, or choose another --out; then run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
