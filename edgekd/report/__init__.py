"""`edgekd report RUNS_DIR`: the study's answer as report.md, a self-contained report.html and CSV files.

Which dataset factors change what KD buys (KD gain against each factor, 95% intervals, negative gains shown as
they are), and whether that gain survives deployment (accuracy against latency per backend and precision with
the Pareto front; the KD gain kept after INT8).
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.config import PRUNE_TAG
from edgekd.errors import EdgeKDError
from edgekd.records import Spread, paired_gain, select_current, variant_label
from edgekd.report import plots
from edgekd.report.sections import (
    factor_answers,
    kept_share,
    study_setups,
    variant_descriptions,
    what_was_run,
)
from edgekd.report.tables import (
    compression_ladder,
    deploy_rows,
    int8_compare_rows,
    not_deployed_rows,
    teacher_rows,
    variant_rows,
    write_csv,
)
from edgekd.runio import write_json


@dataclass
class Report:
    root: Path
    variants: list[dict]
    deploy: list[dict]
    retention: list[dict]
    ladder: list[dict] = field(default_factory=list)  # compression ladder stages, when the study pruned students
    grids: list[dict] = field(default_factory=list)  # run records of tuned methods (their `grid` field)
    explains: list[dict] = field(default_factory=list)  # Grad-CAM records (edgekd/explain.py)
    not_deployed: list[dict] = field(default_factory=list)  # INT8 models the export's guard refused: failed exports
    teachers: list[dict] = field(default_factory=list)  # KD gain per teacher, where methods learn from different ones
    files: dict[str, Path] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # records on disk not current for the study's last plan


def int8_retention(deploy: list[dict], compared: list[dict] = (), failed: list[dict] = ()) -> list[dict]:
    """KD gain on each INT8 model next to the gain on the FP32 ONNX model, paired by seed.

    All are measured on the bundle's evaluation images, so the gains compare like with like; each INT8 preset (cpu,
    trt) and each INT8 method (the deployed one, and those of deploy.int8_compare, `compared`) gets its own row.
    A model the export's guard did not deploy (`failed`) is in no bench, so its seed drops out of the pairing; each
    row counts those seeds (`not_deployed`, of the KD or the scratch student) so the table says what it left out.
    """
    acc: dict[tuple, float] = {}
    for r in (*deploy, *compared):
        variant = variant_label(r["variant"], r.get("family", ""))
        deployed = f"{r['deployed']} ({r['int8_method']})" if r.get("int8_method") else r["deployed"]
        acc[(r["dataset"], variant, r["method"] if r["role"] == "kd" else "", r["seed"], deployed)] = r["accuracy"]

    def by_seed(dataset, variant, method, deployed, seeds=None):
        return {role: {k[3]: v for k, v in acc.items() if k[:3] == (dataset, variant, m) and k[4] == deployed
                       and (seeds is None or k[3] in seeds)} for role, m in (("kd", method), ("scratch", ""))}

    def gain(dataset, variant, method, deployed, seeds=None):
        runs = by_seed(dataset, variant, method, deployed, seeds)
        return paired_gain(runs["kd"], runs["scratch"])

    reference = min((k[4] for k in acc if "fp32" in k[4]), default=None)  # onnx-fp32 where it was benched
    out = []
    rows = {(k[0], k[1], k[2], k[4]) for k in acc if k[2]}
    names = {k[4] for k in acc}
    for f in failed:  # a KD student whose INT8 model was refused on every seed still gets its row
        if f["role"] == "kd":
            rows |= {(f["dataset"], variant_label(f["variant"], f.get("family", "")), f["method"], n)
                     for n in ([n for n in names if n.startswith(f["model"])] or [f["model"]])}
    for dataset, variant, method, deployed in sorted(rows):
        if "int8" not in deployed:
            continue
        g_fp32, g_int8 = gain(dataset, variant, method, reference), gain(dataset, variant, method, deployed)
        int8_runs = by_seed(dataset, variant, method, deployed)
        paired = set(int8_runs["kd"]) & set(int8_runs["scratch"])  # seeds with both INT8 models deployed
        g_fp32_paired = gain(dataset, variant, method, reference, paired) if paired else None
        refused = {role: {f["seed"] for f in failed if f["role"] == role and f["dataset"] == dataset
                          and deployed.startswith(f["model"])
                          and variant_label(f["variant"], f.get("family", "")) == variant
                          and (role == "scratch" or f["method"] == method)} for role in ("kd", "scratch")}
        if g_fp32 and (g_int8 or refused["kd"] or refused["scratch"]):
            out.append({"dataset": dataset, "variant": variant, "method": method, "deployed": deployed,
                        "gain_fp32": g_fp32, "gain_int8": g_int8, "seeds": g_int8.n if g_int8 else 0,
                        # FP32's gain on the seeds the INT8 gain has: what 'kept' divides by
                        "gain_fp32_paired": g_fp32_paired,
                        # seeds left out, and by whose refusal: which student INT8 holds for is a finding too
                        "not_deployed": len(refused["kd"] | refused["scratch"]),
                        "not_deployed_by": {role: len(seeds) for role, seeds in refused.items()}})
    return out


def _pct(s: Spread | None, signed: bool = False, ci: bool = True) -> str:
    if s is None:
        return "-"
    sign = "+" if signed else ""
    if s.n < 2:  # a spread of one value is not zero, it is unknown
        return f"{100 * s.mean:{sign}.2f} (1 seed)"
    ci = f" [±{100 * s.ci95:.2f}]" if ci else ""
    return f"{100 * s.mean:{sign}.2f} ± {100 * s.std:.2f}{ci}"


def _markdown_tables(report: Report) -> list[str]:
    lines = ["| dataset | variant | factor | student | method | teacher | scratch | KD | KD gain (pts, ± std [95% CI]) | "
             "bias / shift metric |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.variants:
        extra = ""
        if r.get("kd_worst_group_acc"):
            extra = f"worst-group {_pct(r['scratch_worst_group_acc'])} → {_pct(r['kd_worst_group_acc'])}"
        elif r.get("kd_tail_acc"):
            extra = f"tail {_pct(r['scratch_tail_acc'])} → {_pct(r['kd_tail_acc'])}"
        elif r.get("kd_shift_mean"):
            extra = (f"mean corrupted acc {_pct(r['scratch_shift_mean'])} → {_pct(r['kd_shift_mean'])} "
                     f"(KD gain {_pct(r['shift_gain'], signed=True)})")
        teacher = f"{100 * r['teacher_acc']:.2f}" if r["teacher_acc"] is not None else "-"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['factor']} | {r['student']} | {r['method']} | {teacher} | "
                     f"{_pct(r['scratch_acc'])} | {_pct(r['kd_acc'])} | {_pct(r['gain'], signed=True)} | {extra} |")
    lines += _method_table(report.variants)
    lines += _teacher_table(report.teachers)
    if report.retention:
        lines += ["", "KD gain after INT8, on the bundles' evaluation images (points, mean ± std over seeds). "
                  "'kept' (the INT8 gain as a share of the FP32 gain) is shown only where the FP32 gain is positive "
                  "and at least 1 point: a share of a loss is not kept, and a ratio of two small numbers says "
                  "nothing; it divides by the FP32 gain on the same seeds as the INT8 gain.", "",
                  "An INT8 model the export's guard did not deploy (it changed more than deploy.int8_max_drop "
                  "percent of FP32's answers on the validation split) is a failed export, not a finding: its seed is left out of the INT8 gain "
                  "and counted under 'not deployed'.", "",
                  "| dataset | variant | method | INT8 model | KD gain FP32 | KD gain INT8 | not deployed | kept |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report.retention:
            g32, g8 = r["gain_fp32"], r["gain_int8"]
            int8 = _pct(g8, signed=True, ci=False) if g8 else "- (no deployed pair)"
            kept = kept_share(r["gain_fp32_paired"], g8) if g8 and r["gain_fp32_paired"] else "-"
            by = r.get("not_deployed_by", {})
            refused = (f"{r['not_deployed']} seed(s): KD {by.get('kd', 0)}, scratch {by.get('scratch', 0)}"
                       if r.get("not_deployed") else "0")
            lines.append(f"| {r['dataset']} | {r['variant']} | {r['method']} | {r['deployed']} | "
                         f"{100 * g32.mean:+.2f} ± {100 * g32.std:.2f} | {int8} | {refused} | {kept} |")
    lines += _cold_start_table(report.deploy)
    lines += _not_deployed_table(report.not_deployed)
    lines += _ladder_table(report.ladder)
    lines += _grid_table(report.grids)
    lines += _explain_table(report.explains)
    return lines


def _teacher_table(rows: list[dict]) -> list[str]:
    """Which teacher teaches best here: per variant and student family, each method's teacher(s), their accuracy and
    the KD gain paired by seed, best first; whether the best's interval excludes the next one's is said, not implied."""
    if not rows:
        return []
    lines = ["", "Which teacher teaches best here? Per variant and student family, the KD methods that learn from "
             "different teachers ([teachers.<name>], a method's `teachers`), best KD gain first (points, mean ± std "
             "[95% CI] over seeds, paired with the same scratch students). A more accurate teacher is not always the "
             "better teacher.", "",
             "| dataset | variant | method | teacher(s) | teacher test acc | KD | KD gain |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], variant_label(r["variant"], r.get("family", ""))), []).append(r)
    verdicts = []
    for (dataset, variant), group in groups.items():
        for r in group:
            accs = ", ".join("-" if a is None else f"{100 * a:.2f}" for a in r["teacher_accs"])
            lines.append(f"| {dataset} | {variant} | {r['method']} | {' + '.join(r['teachers'])} | {accs} | "
                         f"{_pct(r['kd_acc'], ci=False)} | {_pct(r['gain'], signed=True)} |")
        best, second = group[0], group[1]
        if best["gain"] and second["gain"] and best["gain"].n > 1 and second["gain"].n > 1:
            apart = best["gain"].mean - best["gain"].ci95 > second["gain"].mean + second["gain"].ci95
            verdicts.append(f"- {dataset} {variant}: {' + '.join(best['teachers'])} ({best['method']}) teaches best, "
                            + ("its interval clear of the next one's." if apart else
                               f"but its interval overlaps that of {' + '.join(second['teachers'])} "
                               f"({second['method']}): not distinguishable on these seeds."))
    return [*lines, "", *verdicts] if verdicts else lines


def _cold_start_table(deploy: list[dict]) -> list[str]:
    """Per dataset, runner and deployed model: cold start (open, first inference) beside warm p50/p90/p99 at the
    smallest batch benched, medians over the study's bundles (one student's bench is one sample)."""
    groups: dict[tuple, list[dict]] = {}
    for r in deploy:
        if r.get("load_ms") is not None and r["meant_for_device"]:
            groups.setdefault((r["dataset"], f"{r['backend']}/{r['device']}", r["cpu"] if r["device"] == "cpu"
                               else r["device"], r["deployed"]), []).append(r)
    if not groups:
        return []
    median = statistics.median_high  # a measured value, as the ladder's median over seeds
    lines = ["", "Cold start beside warm latency: opening the model (session or engine) and its first inference, "
             "then the warm percentiles at the smallest batch benched, in ms, and the throughput at the batch that "
             "gave the most images/s; medians over the bundles benched (n).", "",
             "| dataset | runner | machine | model | n | load | first inference | batch | p50 | p90 | p99 | "
             "best images/s (batch) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, runner, machine, model), rows in sorted(groups.items()):
        batch = min(r["batch"] for r in rows)
        warm = [r for r in rows if r["batch"] == batch]
        throughput = {b: median(r["throughput_ips"] for r in rows if r["batch"] == b) for b in {r["batch"] for r in rows}}
        best = max(throughput, key=throughput.get)
        lines.append(f"| {dataset} | {runner} | {machine} | {model} | {len(warm)} | "
                     f"{median(r['load_ms'] for r in warm):.1f} | {median(r['first_inference_ms'] for r in warm):.2f} | "
                     f"{batch} | " + " | ".join(f"{median(r[k] for r in warm):.3f}" for k in ("p50_ms", "p90_ms", "p99_ms"))
                     + f" | {throughput[best]:,.0f} ({best}) |")
    return lines


def _not_deployed_table(rows: list[dict]) -> list[str]:
    """The failed exports: INT8 models the guard kept out of deployment, each with why."""
    if not rows:
        return []
    lines = ["", f"INT8 models not deployed ({len(rows)}): failed exports, left out of every INT8 gain, latency and "
             "plot; `edgekd bench BUNDLE --model KEY` still benches one.", "",
             "| dataset | variant | student | seed | model | reason |", "|---|---|---|---|---|---|"]
    for r in rows:
        student = r["method"] if r["role"] == "kd" else r["role"]
        lines.append(f"| {r['dataset']} | {variant_label(r['variant'], r.get('family', ''))} | {student} | "
                     f"{r['seed']} | {r['model']} | {r['reason']} |")
    return lines


def _explain_table(explains: list[dict]) -> list[str]:
    """Per variant and student kind: agreement of Grad-CAM maps with the teacher's, mean ± std over seeds; on a
    spurious variant, the share of map mass on the (misleading) cue patch of bias-conflicting images."""
    if not explains:
        return []
    lines = ["", "Where the students look (Grad-CAM for the true class, or on multi-label data for each class the image has, at the deepest stage with maps of at least 4x4, captum): agreement with "
             "the teacher's maps on the same test images, Spearman rank correlation and IoU of the top pixels, mean "
             "± std over seeds. Cue share: the part of a map on the spurious cue patch of bias-conflicting images, "
             "where the cue points to another class (lower: the model uses the cue less).", "",
             "| dataset | variant | student | images | rank correlation | top IoU | cue share (teacher → student) |",
             "|---|---|---|---|---|---|---|"]
    for e in explains:
        models = e["models"].values()
        teacher = next((m for m in models if m["role"] == "teacher"), {})
        kinds = sorted({(m["role"], m.get("method", "")) for m in models if m["role"] != "teacher"})
        for role, method in kinds:
            mine = [m for m in models if (m["role"], m.get("method", "")) == (role, method)]
            corr, iou = Spread.of([m["rank_corr"] for m in mine]), Spread.of([m["top_iou"] for m in mine])
            cue = "-"
            if e.get("cue"):
                share = Spread.of([m["cue_share"] for m in mine])
                cue = f"{100 * teacher.get('cue_share', float('nan')):.1f}% → {100 * share.mean:.1f} ± {100 * share.std:.1f}%"
            who = method or role
            images = e["images"] if e.get("maps_per_model", e["images"]) == e["images"] else \
                f"{e['images']} ({e['maps_per_model']} image-label maps)"
            lines.append(f"| {e['dataset']} | {variant_label(e['variant'], e.get('family', ''))} | {who} | "
                         f"{images} | {corr.mean:.3f} ± {corr.std:.3f} | {iou.mean:.3f} ± {iou.std:.3f} | {cue} |")
    return lines + _explain_per_label(explains)


def _explain_per_label(explains: list[dict]) -> list[str]:
    """Multi-label Grad-CAM: each student kind's rank correlation with the teacher's maps per label, over seeds."""
    rows = []
    for e in explains:
        students = [m for m in e["models"].values() if m.get("per_label_rank_corr")]
        for role, method in sorted({(m["role"], m.get("method", "")) for m in students}):
            mine = [m["per_label_rank_corr"] for m in students if (m["role"], m.get("method", "")) == (role, method)]
            labels = sorted({k for m in mine for k in m})
            cells = " ".join(f"{k}: {Spread.of([m[k] for m in mine if k in m]).mean:.2f}" for k in labels)
            rows.append(f"| {e['dataset']} | {variant_label(e['variant'], e.get('family', ''))} | {method or role} "
                        f"| {cells} |")
    if not rows:
        return []
    return ["", "Grad-CAM per label (multi-label data): each student's rank correlation with the teacher's maps of "
            "the same label, mean over seeds.", "", "| dataset | variant | student | per label |", "|---|---|---|---|",
            *rows]


def _grid_table(records: list[dict]) -> list[str]:
    """Each tuned method's candidates with their validation accuracy on the first seed, the chosen one in bold."""
    seen, lines = set(), []
    for r in records:
        grid = r.get("grid") or {}
        key = (r["dataset"], variant_label(r["variant"], r.get("family", "")), r["method"])
        if "chosen" not in grid or key in seen or PRUNE_TAG in r["method"]:  # a pruned run repeats its method's
            continue
        seen.add(key)
        cells = []
        for k, c in enumerate(grid["candidates"]):
            params = ", ".join(f"{name} {value:g}" for name, value in c["params"].items())
            text = f"{params}: {100 * c['val_acc']:.2f}"
            cells.append(f"**{text}**" if k == grid["chosen"] else text)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {grid['seed']} | " + "; ".join(cells) + " |")
    if not lines:
        return []
    return ["", "Hyper-parameters chosen on validation: each candidate trained on one seed, validation accuracy (%), "
            "the choice in bold; every seed of the method then trained with it. Test accuracy played no part.", "",
            "| dataset | variant | method | seed | candidates: validation accuracy |", "|---|---|---|---|---|",
            *lines]


def _ladder_table(ladder: list[dict]) -> list[str]:
    if not ladder:
        return []
    batches = sorted({b for r in ladder for b in r["p50_ms"]})
    lines = ["", "Compression ladder: each stage of a KD student on the bundles' evaluation images. KD gain is over the "
             "FP32 scratch student on the same images, paired by seed; 'kept' is the stage's gain as a share of the "
             "FP32 stage's, shown only where that is at least 1 point. Latency is the median over seeds of each "
             "bundle's p50.", "",
             "| dataset | variant | method | stage | runner | accuracy | KD gain (pts) | kept | parameters | file MiB | "
             + " | ".join(f"p50 ms b{b}" for b in batches) + " |", "|---" * (10 + len(batches)) + "|"]
    fp32 = {(r["dataset"], r["variant"], r["method"], r["runner"]): r["gain"] for r in ladder if r["stage"] == "FP32"}
    for r in ladder:
        g, ref = r["gain"], fp32.get((r["dataset"], r["variant"], r["method"], r["runner"]))
        kept = kept_share(ref, g) if g and ref and r["stage"] != "FP32" else "-"
        params = f"{r['params'] / 1e6:.3f}M" if r.get("params") else "-"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['method']} | {r['stage']} | {r['runner']} | "
                     f"{_pct(r['accuracy'], ci=False)} | {_pct(g, signed=True)} | {kept} | {params} | "
                     f"{r['file_mib']:.2f} | " + " | ".join(f"{r['p50_ms'][b]:.2f}" if b in r["p50_ms"] else "-"
                                                            for b in batches) + " |")
    return lines


def _method_table(rows: list[dict]) -> list[str]:
    """Methods x variants: KD test accuracy and gain over scratch, once a study compares two or more methods."""
    methods = sorted({r["method"] for r in rows})
    if len(methods) < 2:
        return []
    columns = sorted({(r["dataset"], r["variant"], r["student"]) for r in rows})
    cell = {(r["method"], (r["dataset"], r["variant"], r["student"])): r for r in rows}
    scratch = {c: next(r["scratch_acc"] for (m, cc), r in cell.items() if cc == c) for c in columns}
    lines = ["", "Methods x variants: test accuracy, mean ± std over seeds; in brackets the KD gain over scratch, "
             "paired by seed (points, ± std).", "",
             "| method | " + " | ".join(f"{d} {v} ({s})" for d, v, s in columns) + " |",
             "|---|" + "---|" * len(columns),
             "| scratch | " + " | ".join(_pct(scratch[c], ci=False) for c in columns) + " |"]
    for m in methods:
        cells = []
        for c in columns:
            r = cell.get((m, c))
            g = r["gain"] if r else None
            cells.append(f"{_pct(r['kd_acc'], ci=False)} ({_pct(g, signed=True, ci=False)})" if g else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def build_report(study_root: Path) -> Report:
    study_root = Path(study_root)
    selection = select_current(study_root)  # only records whose keys match the study's last plan
    records = [r.as_dict() for r in selection.runs]
    if not records:
        raise EdgeKDError(f"no finished runs under {str(study_root)!r}: pass a study directory such as runs/quickstart")
    out = study_root / "report"
    out.mkdir(exist_ok=True)
    deploy = deploy_rows(study_root, selection.benches)
    refused = not_deployed_rows(selection.benches)
    report = Report(study_root, variant_rows(records), deploy,
                    int8_retention(deploy, int8_compare_rows(selection.benches), refused),
                    compression_ladder(deploy, records), [r for r in records if (r.get("grid") or {}).get("chosen")
                                                          is not None], selection.explains,
                    left_out=selection.left_out, not_deployed=refused, teachers=teacher_rows(records))
    write_csv(out / "runs.csv", records)
    write_csv(out / "variants.csv", report.variants)
    write_csv(out / "deploy.csv", deploy)
    write_csv(out / "int8_retention.csv", report.retention)
    if report.ladder:
        write_csv(out / "compression_ladder.csv", report.ladder)
    write_json(study_root / "summary.json", records)
    batches = sorted({r["batch"] for r in deploy})
    figures = {
        "kd_gain_by_factor": plots.kd_gain_by_factor(report.variants),
        "kd_gain_by_method": plots.method_gain_heatmap(report.variants),
        **{f"accuracy_vs_latency_b{b}": plots.accuracy_vs_latency(deploy, b) for b in batches[:1] + batches[-1:]},
        "int8_retention": plots.int8_retention(report.retention),
        "shift_curves": plots.shift_curves(report.variants),
        "compression_ladder": plots.compression_ladder(report.ladder),
        **{f"gradcam_{e['dataset']}_{variant_label(e['variant'], e.get('family', ''))}": plots.gradcam_grid(
            Path(e["path"]).parent / "maps.npz", f"Grad-CAM, {e['dataset']} {e['variant']}: image, teacher, scratch "
            f"and KD students (first seed), {e.get('target', 'true class')}") for e in report.explains},
    }
    figures = {k: v for k, v in figures.items() if v}
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    title = f"edgekd report: {study_root.name}"
    setups = study_setups(study_root, records)
    answers = factor_answers(report.variants, variant_descriptions(setups))
    other = sorted({(r["dataset"], r["metric"]) for r in report.variants if r.get("metric", "accuracy") != "accuracy"})
    scored = "".join(f" Dataset {d!r} is multi-label: its accuracies are {m} in % (mean over classes of the ROC AUC "
                     "of each class's score), every gain in points of it, and an INT8 model's answers are its "
                     "per-class present/absent decisions." for d, m in other)
    md = [f"# {title}", "", "Test accuracy in %; students as mean ± std over seeds [95% interval]; KD gain is KD minus "
          f"scratch paired by seed, negative where KD hurt.{scored}", ""]
    if answers:
        md += ["## Answers", "", "Per dataset factor: what KD changed, in points of test accuracy, with the 95% "
               "interval of the paired gain; a gain is distinguishable from zero when its interval excludes zero.",
               "", *answers]
    md += ["## Results", "", *_markdown_tables(report), ""]
    if figures:
        md += ["## Figures", ""]
        for name in figures:
            note = next((text for key, text in FIGURE_NOTES.items() if name.startswith(key)), None)
            md += [f"![{name}]({name}.png)", *([f"*{note}*"] if note else []), ""]
    md += what_was_run(study_root, records, report.variants, setups)
    if selection.left_out:
        shown = selection.left_out[:20]
        md += ["", "## Left out", "", f"{len(selection.left_out)} record(s) in the study directory are not current for "
               "the profile it was last run with (their keys differ), and are not in any table or figure:", "",
               *[f"- `{line.split(': ', 1)[0]}`: {line.split(': ', 1)[-1]}" for line in shown],
               *([f"- and {len(selection.left_out) - len(shown)} more"] if len(selection.left_out) > len(shown) else [])]
    text = "\n".join(md).rstrip("\n") + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_html(title, text, figures))
    report.files = {"md": out / "report.md", "html": out / "report.html", "csv": out / "variants.csv",
                    "deploy_csv": out / "deploy.csv"}
    return report


FIGURE_NOTES = {
    "kd_gain_by_factor": "KD gain per dataset variant, coloured by factor: bars are means over seeds, thick "
                         "whiskers ± std, thin whiskers the 95% interval.",
    "kd_gain_by_method": "KD gain of each method on each variant, blue where KD helped, red where it hurt.",
    "accuracy_vs_latency": "Accuracy against p50 latency, one panel per variant, device and clock; the dashed line "
                           "is the Pareto front. Models not made for the device they were timed on are left out and "
                           "counted in the panel's title.",
    "int8_retention": "KD gain on the FP32 ONNX model beside each INT8 model's, paired by seed.",
    "shift_curves": "Accuracy of scratch and KD students on corrupted test sets, by severity.",
    "gradcam": "Grad-CAM maps for the true class (multi-label: for each class the image has, named above its row) over "
               "a few test images of the variant.",
    "compression_ladder": "Each compression stage of a KD student: accuracy against p50 latency at the largest "
                          "batch benched, stages joined in ladder order.",
}


def _inline(text: str) -> str:
    """Escaped text with **bold** and `code` spans."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


_NBSP_PM = "\u00a0±\u00a0"
_NUMBER = re.compile(r"[+\-−]?[\d.]+%?( ± [\d.]+)?( \[±[\d.]+\])?")  # right-aligned: a number or a spread


def _cells(row: list[str], tag: str) -> str:
    """Table cells; numbers and spreads right-aligned, "mean ± std" kept on one line."""
    out = []
    for c in row:
        num = " class=num" if tag == "td" and _NUMBER.fullmatch(c) else ""
        out.append(f"<{tag}{num}>{_inline(c).replace(' ± ', _NBSP_PM)}</{tag}>")
    return "".join(out)


def _html(title: str, markdown: str, figures: dict[str, bytes]) -> str:
    """A self-contained page from the report's markdown (headings, paragraphs, lists, tables, figures), the figures
    embedded as base64 PNG."""
    body: list[str] = []
    table: list[list[str]] = []
    para: list[str] = []
    items: list[str] = []
    caption = re.compile(r"\*([^*].*)\*")

    def flush():
        if table:
            head, *rest = table
            body.append('<div class="scroll"><table><thead><tr>' + _cells(head, "th") + "</tr></thead><tbody>"
                        + "".join(f"<tr>{_cells(r, 'td')}</tr>" for r in rest) + "</tbody></table></div>")
            table.clear()
        if para:
            body.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in markdown.splitlines():
        image = re.fullmatch(r"!\[(.*)\]\((.+)\.png\)", line)
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            if para or items:
                flush()
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if caption.fullmatch(line) and not para and body and body[-1].startswith("<figure>"):
            body[-1] = body[-1].split("<figcaption>")[0] + f"<figcaption>{_inline(line[1:-1])}</figcaption></figure>"
            continue
        flush()
        if not line.strip():
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif image and image.group(2) in figures:
            name = image.group(2)
            body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                        f'{base64.b64encode(figures[name]).decode()}"><figcaption>{html.escape(name.replace("_", " "))}'
                        "</figcaption></figure>")
        elif line.startswith("- "):
            items.append(line[2:])
        else:
            para.append(line)
    flush()
    style = ("*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1em;"
             "max-width:1200px;line-height:1.45;color:#222}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px "
             "solid #ddd}.scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;margin:1em 0;"
             "font-size:.92em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;"
             "overflow-wrap:break-word}th{background:#f3f3f3}td.num{text-align:right}"
             "figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}"
             "p,li{max-width:75em;overflow-wrap:anywhere}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "".join(body) + "</body></html>\n")
