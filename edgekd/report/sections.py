"""The report's prose, as markdown lines: a one-paragraph answer per dataset factor, written from the paired KD
gains and their 95% intervals, and "what was run" (data, teachers, training settings, machine, time per phase),
read from the study's own records. Standard library only, like the rest of `edgekd report`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from edgekd.records import GRID_TAG, Spread, read_bundles, read_run_setup, select_current, teacher_for
from edgekd.runio import METRICS

DASH = "—"


# -- formatting ----------------------------------------------------------------------------------------------------
def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _share(x: float) -> str:
    return f"{100 * x:g}%"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def kept_share(gain_fp32: Spread, gain_int8: Spread) -> str:
    """The INT8 KD gain as a share of the FP32 one, only where the FP32 gain is positive and at least 1 point:
    a share of a loss is not "kept", and a ratio of two small numbers says nothing; a compressed gain below zero
    keeps none."""
    if gain_fp32.mean < 0.01:
        return DASH
    if gain_int8.mean < 0:  # the compressed student is worse than scratch: nothing of the gain is left
        return "none (KD now hurts)"
    return f"{100 * gain_int8.mean / gain_fp32.mean:.0f}%"


# -- answers -------------------------------------------------------------------------------------------------------
def gain_verdict(gain: Spread) -> str:
    """"KD +x.xx points [lo, hi], n seeds: <verdict>", the verdict from whether the 95% interval excludes zero."""
    if gain.n < 2:
        return f"KD {_pts(gain.mean)} points from one seed: no interval, so it cannot be told from zero"
    lo, hi = gain.mean - gain.ci95, gain.mean + gain.ci95
    text = f"KD {_pts(gain.mean)} points [{_pts(lo)}, {_pts(hi)}], {gain.n} seeds"
    boot = gain.bootstrap95()
    if boot:
        text += f" (paired bootstrap [{_pts(boot[0])}, {_pts(boot[1])}])"
    if lo > 0:
        return f"{text}: a gain distinguishable from zero"
    if hi < 0:
        return f"{text}: KD hurts, distinguishably from zero"
    return f"{text}: not distinguishable from zero"


def describe_variant(config: dict | None, multilabel: bool = False) -> str:
    """What a variant changed, in words, from its profile entry ("" where the record has none); `multilabel`: the
    dataset's images carry label sets, which label noise changes by swapping one label (data.variants)."""
    if not config:
        return ""
    kind = config.get("kind", "base")
    if multilabel and kind == "label_noise":
        return f"{_share(config.get('rate', 0.0))} of the label sets with one label swapped for an absent one"
    text = {
        "base": "the data as it is",
        "fraction": f"{_share(config.get('fraction', 1.0))} of the training set",
        "labels": f"labels on {_share(config.get('fraction', 1.0))} of the training set",
        "per_class": f"{config.get('per_class')} training images per class",
        "imbalance": f"class imbalance, ratio {config.get('ratio', 1.0):g}",
        "label_noise": f"{_share(config.get('rate', 0.0))} {config.get('noise', 'symmetric')} label noise",
        "spurious": f"a cue agreeing with the label on {_share(config.get('p', 0.9))} of training images",
        "classes": f"classes {', '.join(map(str, config.get('classes') or []))}",
        "corruption": f"test-time {', '.join(config.get('corruptions') or [])}, severities "
                      f"{', '.join(map(str, config.get('severities') or []))}",
        "resolution": f"test images at {config.get('resolution')} px",
    }.get(kind, kind)
    if config.get("shift") and kind != "corruption":
        text += ", also tested under corruption"
    return text


def _clear_gain(gain: Spread) -> bool:
    return gain.n >= 2 and gain.mean - gain.ci95 > 0


def _clear_loss(gain: Spread) -> bool:
    return gain.n >= 2 and gain.mean + gain.ci95 < 0


def _interval(gain: Spread) -> str:
    if gain.n < 2:
        return f"{_pts(gain.mean)}, one seed"
    return f"{_pts(gain.mean)} [{_pts(gain.mean - gain.ci95)}, {_pts(gain.mean + gain.ci95)}]"


def _methods_verdict(rows: list[dict], top_clear: dict | None, where: str) -> str:
    """One student's methods on one variant, sorted into what the intervals allow, each group by mean gain: with a
    dozen methods, a verdict per method is a wall of text; these three lists are what a reader acts on."""
    rows = sorted(rows, key=lambda r: -r["gain"].mean)
    helps = [r for r in rows if _clear_gain(r["gain"])]
    hurts = [r for r in rows if _clear_loss(r["gain"])]
    unclear = [r for r in rows if r not in helps and r not in hurts]

    def listed(group):
        return ", ".join(f"{r['method']} {_interval(r['gain'])}"
                         + (f" (the largest such gain{where})" if r is top_clear else "") for r in group) or "none"

    seeds = sorted({r["gain"].n for r in rows})
    text = (f"{rows[0]['student']}, KD gain in points [95% interval] over {'/'.join(map(str, seeds))} seeds — "
            f"distinguishable gains: {listed(helps)}; distinguishable losses: {listed(hurts)}; "
            f"not distinguishable from zero: {listed(unclear)}")
    weak = [r for r in rows if r.get("teacher_acc") is not None and r["kd_acc"] is not None
            and r["teacher_acc"] <= r["kd_acc"].mean]
    if weak:
        text += (f" (warning: the teacher, {100 * weak[0]['teacher_acc']:.2f}%, is no better than the "
                 f"{', '.join(r['method'] for r in weak)} students)")
    return text


def factor_answers(rows: list[dict], described: dict[tuple[str, str], str] | None = None) -> list[str]:
    """One markdown paragraph per (dataset,) factor: each variant's KD gain per student with its 95% interval and
    whether it is distinguishable from zero; the largest such gain named (and the largest mean gain where that one
    is not distinguishable from zero); a teacher no better than its students flagged."""
    described = described or {}
    rows = [r for r in rows if r.get("gain") is not None]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    several_methods = len({r["method"] for r in rows}) > 1
    out = []
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        top = max(mine, key=lambda r: r["gain"].mean)
        clear = [r for r in mine if _clear_gain(r["gain"])]
        top_clear = max(clear, key=lambda r: r["gain"].mean) if clear else None
        where = f" on {dataset}" if len(datasets) > 1 else ""
        for factor in dict.fromkeys(r["factor"] for r in mine):
            sentences = []
            for variant in dict.fromkeys(r["variant"] for r in mine if r["factor"] == factor):
                what = described.get((dataset, variant))
                here = [r for r in mine if r["factor"] == factor and r["variant"] == variant]
                if several_methods:
                    sentences.append(f"{variant}{f' ({what})' if what else ''} — "
                                     + "; ".join(_methods_verdict([r for r in here if r["student"] == student],
                                                                  top_clear, where)
                                                 for student in dict.fromkeys(r["student"] for r in here)) + ".")
                    continue
                phrases = []
                for r in here:
                    who = r["student"] + (f", {r['method']}" if several_methods else "")
                    phrase = f"{who}: {gain_verdict(r['gain'])}"
                    if len(mine) > 1 and r is top_clear:
                        phrase += f", the largest such gain{where}"
                    elif len(mine) > 1 and r is top and r["gain"].mean > 0:
                        phrase += f", though the largest mean gain{where}"
                    students = [s.mean for s in (r["scratch_acc"], r["kd_acc"]) if s is not None]
                    if r.get("teacher_acc") is not None and students and r["teacher_acc"] <= max(students):
                        phrase += (f" (warning: the teacher, {100 * r['teacher_acc']:.2f}%, is no better than "
                                   f"these students, {100 * max(students):.2f}%)")
                    phrases.append(phrase)
                sentences.append(f"{variant}{f' ({what})' if what else ''} — " + "; ".join(phrases) + ".")
            head = f"**{factor}**" + (f" ({dataset})" if len(datasets) > 1 else "")
            out += [f"{head}: " + " ".join(sentences), ""]
    return out


# -- what was run --------------------------------------------------------------------------------------------------
def _skipped(notes: Iterable[str]) -> str:
    counts = [int(m.group(1)) for n in notes if (m := re.search(r"(\d+) unreadable", n))]
    return str(sum(counts))


def _per_class(stats: dict | None) -> str:
    counts = (stats or {}).get("train_per_class")
    if not counts:
        return DASH
    return f"{min(counts)} each" if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"


def _data_section(setups: list[tuple[dict, dict]], described: dict) -> list[str]:
    seen: dict[tuple[str, str], tuple[dict, dict]] = {}
    for r, s in sorted(setups, key=lambda rs: rs[0]["role"] not in ("scratch", "kd")):  # students' data first
        if "data" in s:
            seen.setdefault((r["dataset"], r["variant"]), (r, s))
    if not seen:
        return []
    lines = ["### Data", "", "Per dataset variant, as its runs recorded it: the validation split is carved from the "
             "training data; the loaders skip and count files they cannot decode (unreadable).", "",
             "| dataset | variant | what it changes | source | classes | image | train | val | test | "
             "train per class | unreadable files skipped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[str, list] = {}
    class_lines, notes = [], []
    for (dataset, variant), (_, s) in seen.items():
        d = s["data"]
        sizes = d.get("sizes", {})
        lines.append(f"| {dataset} | {variant} | {described.get((dataset, variant)) or DASH} | {d.get('origin', DASH)} | "
                     f"{len(d.get('classes', []))} | {d.get('channels', '?')}×{d.get('image_size', '?')}"
                     f"×{d.get('image_size', '?')} | {sizes.get('train', DASH)} | {sizes.get('val', DASH)} | "
                     f"{sizes.get('test', DASH)} | {_per_class(s.get('variant_stats'))} | "
                     f"{_skipped(d.get('notes', []))} |")
        names = d.get("classes") or []
        if dataset not in first:
            first[dataset] = names
            class_lines += [f"Classes of {dataset}: {', '.join(map(str, names))}.", ""]
        elif names != first[dataset]:
            class_lines += [f"Classes of {dataset} {variant}: {', '.join(map(str, names))}.", ""]
        notes += [f"- {dataset} {variant}: {n}" for n in d.get("notes", [])]
    lines += ["", *class_lines]
    if notes:
        lines += ["Loader notes:", "", *notes, ""]
    return lines


def _teacher_section(records: list[dict], rows: list[dict]) -> list[str]:
    teachers = {(r["dataset"], r["variant"]): r for r in records if r["role"] == "teacher" and not r.get("family")}
    if not teachers:
        return []
    lines = ["### Teachers", "", "A teacher no better than its students has little knowledge to pass on: "
             "KD gains under such a teacher are better read as regularisation than as transfer.", "",
             "| dataset | teacher | trained on | test accuracy | best student it taught (mean over seeds) | check |",
             "|---|---|---|---|---|---|"]
    for key, t in teachers.items():
        taught = [r for r in rows if teacher_for(teachers, r["dataset"], r["variant"]) is t]
        best, who = None, DASH
        for r in taught:
            for role, s in (("scratch", r["scratch_acc"]), (r["method"], r["kd_acc"])):
                if s is not None and (best is None or s.mean > best):
                    best, who = s.mean, f"{100 * s.mean:.2f} ({role}, {r['student']}, {r['variant']})"
        acc = t.get("test_acc")
        if acc is None or best is None:
            check = DASH
        elif acc <= best:
            check = f"**warning: no better than its students** ({100 * (acc - best):+.2f} points)"
        else:
            check = f"better by {100 * (acc - best):.2f} points"
        lines.append(f"| {key[0]} | {t.get('model') or DASH} | {key[1]} | "
                     f"{f'{100 * acc:.2f}' if acc is not None else DASH} | {who} | {check} |")
    return [*lines, ""]


def _role(r: dict) -> str:
    if r["role"] == "teacher":
        return "teacher" + (f" {r['family']}" if r.get("family") else "")
    return "student" + (f" {r['family']}" if r.get("family") else "")


def _value(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(_value, v))
    return f"{v:g}" if isinstance(v, float) else str(v)  # a stage -2.0 read back from JSON is the -2 written


def _loss_text(losses: dict) -> str:
    terms = []
    for name, spec in losses.items():
        if isinstance(spec, dict):
            params = ", ".join(f"{k} {_value(v)}" for k, v in spec.items())
            terms.append(f"{name} ({params})" if params else name)
        else:
            terms.append(f"{name} {_value(spec)}")
    return " + ".join(terms)


def _method_lines(methods: dict[str, dict[str, list[str]]]) -> list[str]:
    """One line per method; a method tuned on validation may train with other values per variant, so each of its
    settings is named with the variants that used it."""
    lines = []
    for method, settings in methods.items():
        if len(settings) == 1:
            lines.append(f"- {method}: {next(iter(settings))}")
        else:
            lines += [f"- {method} ({', '.join(variants)}): {text}" for text, variants in settings.items()]
    return lines


def _training_section(setups: list[tuple[dict, dict]]) -> list[str]:
    groups: dict[str, dict] = {}
    methods: dict[str, dict[str, list[str]]] = {}  # method -> its loss text -> the variants that trained with it
    for r, s in setups:
        if "train" not in s:
            continue
        g = groups.setdefault(_role(r), {"train": s["train"], "roles": set(), "epochs": set(), "precision": set(),
                                         "channels_last": set(), "compile": set(), "device": set(), "runs": 0})
        g["roles"].add(r["role"])
        g["runs"] += 1
        if r.get("epochs") is not None:
            g["epochs"].add(r["epochs"])
        ex = s.get("execution") or {}
        for key in ("precision", "channels_last", "compile", "device"):
            if key in ex:  # channels_last and compile are configured as auto | on | off and recorded as run: True or
                # False, a torch.compile mode or "" (eager)
                g[key].add({True: "on", False: "off", "": "off"}.get(ex[key], str(ex[key])))
        # Grid candidates (kd~1) are listed in the grid table; here only what the study's students trained with.
        if r["role"] == "kd" and s.get("losses") and GRID_TAG not in r["method"]:
            variants = methods.setdefault(r["method"], {}).setdefault(_loss_text(s["losses"]), [])
            if r["variant"] not in variants:
                variants.append(r["variant"])
    if not groups:
        return []
    lines = ["### Training settings", "", "As each role's runs recorded them (profile.json; precision, channels "
             "last and torch.compile as configured → as run).", "",
             "| role | runs | model | epochs (ran) | batch | optimizer | lr | weight decay | warmup epochs | "
             "label smoothing | precision | channels last | torch.compile | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for role, g in groups.items():
        t = g["train"]
        ran = sorted(g["epochs"])
        epochs = str(t.get("epochs", DASH))
        if ran and ran != [t.get("epochs")]:
            epochs += f" ({ran[0]}–{ran[-1]})" if len(ran) > 1 else f" ({ran[0]})"
        if t.get("min_steps"):
            epochs += f", ≥ {t['min_steps']} steps"
        optimizer = str(t.get("optimizer", DASH)) + (f" (momentum {t.get('momentum')})" if t.get("optimizer") == "sgd"
                                                      else "")

        def as_run(key, g=g, t=t):
            if key not in t and not g[key]:  # a run older than the setting
                return DASH
            configured = str(t.get(key, DASH))
            run = ", ".join(sorted(g[key])) or "?"
            return configured if run == configured else f"{configured} → {run}"

        roles = f" ({', '.join(sorted(g['roles']))})" if role.startswith("student") else ""
        lines.append(f"| {role}{roles} | {g['runs']} | {t.get('model', DASH)} | {epochs} | "
                     f"{t.get('batch_size', DASH)} | {optimizer} | {t.get('lr', DASH)} | {t.get('weight_decay', DASH)} | "
                     f"{t.get('warmup_epochs', DASH)} | {t.get('label_smoothing', DASH)} | {as_run('precision')} | "
                     f"{as_run('channels_last')} | {as_run('compile')} | {', '.join(sorted(g['device'])) or DASH} |")
    lines.append("")
    if methods:
        lines += ["KD methods (loss terms and weights):", "", *_method_lines(methods), ""]
    return lines


def _flags(flags: list[str]) -> str:
    """avx512f, avx512bw, ... shown as "avx512 (bw, f, ...)"; amx_tile, amx_int8 as "amx (int8, tile)"."""
    out, families = [], {}
    for flag in sorted(flags):
        family = next((f for f in ("avx512", "amx") if flag.startswith(f)), None)
        if family:
            families.setdefault(family, []).append(flag[len(family):].lstrip("_") or family)
        else:
            out.append(flag)
    out += [f"{family} ({', '.join(sorted(parts))})" for family, parts in families.items()]
    return ", ".join(out) or "none of avx2, avx512, vnni, amx, neon, dotprod"


def _runtimes(packages: dict) -> str:
    """The inference runtimes a bench machine had, with versions (the ones a latency depends on)."""
    return ", ".join(f"{name} {packages[name]}" for name in ("onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt",
                                                        "executorch", "torch")
                     if packages.get(name))


def _machine_section(benches: list, setups: list[tuple[dict, dict]]) -> list[str]:
    lines = ["### Machine", ""]
    devices = sorted({str((s.get("execution") or {}).get("device")) for _, s in setups if s.get("execution")})
    if devices:
        lines.append(f"- Training device: {', '.join(devices)} (from the runs' execution records, which do not name "
                     "the CPU or GPU model).")
    machines: dict[tuple, set] = {}
    counts: dict[tuple, int] = {}
    for b in benches:
        env = b.environment
        flags = env.get("cpu_flags")
        gpu = env.get("gpu")
        gpu_text = (f"{gpu.get('gpu')} ({gpu.get('memory')}, driver {gpu.get('driver')})"
                    if isinstance(gpu, dict) and gpu.get("gpu")
                    else f"none usable (nvidia-smi: {gpu['nvidia_smi']})" if isinstance(gpu, dict)
                    else (str(gpu) if gpu else "none found"))
        on = b.on or {}
        where = (f"**{on['name']}** ({on.get('reach')} {on.get('address') or ''}".rstrip() + ", host "
                 f"{on.get('hostname') or '?'}), {b.device}" if on.get("name") else b.device)
        key = (env.get("cpu", "?"), env.get("cores", "?"), _flags(flags) if flags is not None else None, gpu_text,
               str(env.get("threads", "?")), _runtimes(env.get("packages") or {}), where)
        machines.setdefault(key, set()).add(b.backend)
        counts[key] = counts.get(key, 0) + 1
    for (cpu, cores, flags, gpu, threads, runtimes, where), backends in machines.items():
        n = counts[(cpu, cores, flags, gpu, threads, runtimes, where)]
        flag_text = flags if flags is not None else "not recorded (benched before edgekd recorded CPU flags)"
        lines.append(f"- Benchmarked on {where} ({n} bench file{'s' if n > 1 else ''}, backends "
                     f"{', '.join(sorted(backends))}): CPU {cpu}, {cores} cores; speed-relevant CPU flags: {flag_text}; "
                     f"GPU: {gpu}; threads: {threads}" + (f"; {runtimes}" if runtimes else "") + ".")
    return [*lines, ""] if len(lines) > 2 else []


def _time_section(records: list[dict], bundles: list, benches: list) -> list[str]:
    def row(phase, values, total_jobs, unit, source):
        known = [v for v in values if v is not None]
        jobs = f"{len(known)} of {total_jobs} {unit}" if len(known) < total_jobs else f"{total_jobs} {unit}"
        total = duration(sum(known)) if known else "not recorded"
        return f"| {phase} | {jobs} | {total} | {source} |"

    distill = [r.get("wall_s") for r in records]
    exports = [b.manifest.get("export_s") for b in bundles]
    bench = [b.wall_s for b in benches]
    lines = ["### Time per phase", "", "Summed job times as edgekd recorded them, not elapsed time: jobs run side by "
             "side (--jobs) overlap, and a resumed training counts its time before the interruption. A record written "
             "before edgekd recorded its time is left out (\"k of n\").", "",
             "| phase | jobs timed | summed job time | recorded in |", "|---|---|---|---|",
             row("distill", distill, len(distill), "runs", "each run's metrics.json wall_s (teachers, teacher caches, "
                 "students)")]
    if bundles:
        lines.append(row("export", exports, len(exports), "bundles", "each bundle's manifest.json export_s (its latest "
                         "export)"))
    if benches:
        lines.append(row("bench", bench, len(bench), "bench files", "each bench file's wall_s"))
    return [*lines, ""]


def study_setups(root: Path, records: list[dict]) -> list[tuple[dict, dict]]:
    """(summary record, run setup) for each run in `records` whose directory holds its metrics.json."""
    root = Path(root)
    return [(r, read_run_setup(root / r["run_dir"])) for r in records
            if r.get("run_dir") and (root / r["run_dir"] / METRICS).is_file()]


def variant_descriptions(setups: list[tuple[dict, dict]]) -> dict[tuple[str, str], str]:
    """(dataset, variant) -> what the variant changes, in words."""
    out = {}
    for r, s in setups:
        if s.get("variant_config") and (r["dataset"], r["variant"]) not in out:
            out[(r["dataset"], r["variant"])] = describe_variant(s["variant_config"],
                                                                 r.get("metric", "accuracy") != "accuracy")
    return out


def what_was_run(root: Path, records: list[dict], rows: list[dict], setups: list[tuple[dict, dict]]) -> list[str]:
    """The "what was run" section, restricted to the runs in `records` (and their bundles and bench files)."""
    root = Path(root)
    run_dirs = {r.get("run_dir") for r in records}
    bundles = [b for b in read_bundles(root) if str(b.path.parent.relative_to(root)) in run_dirs]
    benches = [b for b in select_current(root).benches  # bench files whose keys are current
               if b.run is not None and b.run.run_dir in run_dirs]
    return ["## What was run", "", *_data_section(setups, variant_descriptions(setups)),
            *_teacher_section(records, rows), *_training_section(setups), *_machine_section(benches, setups),
            *_time_section(records, bundles, benches)]
