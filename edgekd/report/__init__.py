"""`edgekd report RUNS_DIR`: the study's answer as report.md, a self-contained report.html and CSV files.

Which dataset factors change what KD buys (KD gain against each factor, 95% intervals, negative gains shown as
they are), and whether that gain survives deployment (accuracy against latency per backend and precision with
the Pareto front; the KD gain kept after INT8).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.records import Spread, collect, paired_gain, variant_label
from edgekd.report import plots
from edgekd.report.tables import deploy_rows, variant_rows, write_csv
from edgekd.runio import write_json


@dataclass
class Report:
    root: Path
    variants: list[dict]
    deploy: list[dict]
    retention: list[dict]
    files: dict[str, Path] = field(default_factory=dict)


def int8_retention(deploy: list[dict]) -> list[dict]:
    """KD gain on each deployed INT8 model next to the gain on the FP32 ONNX model, paired by seed.

    Both are measured on the bundle's evaluation images by the same runner, so the two gains compare like with
    like; each INT8 preset (cpu, trt) gets its own row.
    """
    acc: dict[tuple, float] = {}
    for r in deploy:
        variant = variant_label(r["variant"], r.get("family", ""))
        acc[(r["dataset"], variant, r["method"] if r["role"] == "kd" else "", r["seed"], r["deployed"])] = r["accuracy"]

    def gain(dataset, variant, method, deployed):
        by_seed = {role: {k[3]: v for k, v in acc.items() if k[:3] == (dataset, variant, m) and k[4] == deployed}
                   for role, m in (("kd", method), ("scratch", ""))}
        return paired_gain(by_seed["kd"], by_seed["scratch"])

    reference = min((k[4] for k in acc if "fp32" in k[4]), default=None)  # onnx-fp32 where it was benched
    out = []
    for dataset, variant, method, deployed in sorted({(k[0], k[1], k[2], k[4]) for k in acc if k[2]}):
        if "int8" not in deployed:
            continue
        g_fp32, g_int8 = gain(dataset, variant, method, reference), gain(dataset, variant, method, deployed)
        if g_fp32 and g_int8:
            out.append({"dataset": dataset, "variant": variant, "method": method, "deployed": deployed,
                        "gain_fp32": g_fp32, "gain_int8": g_int8, "seeds": g_int8.n})
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
    if report.retention:
        lines += ["", "KD gain after INT8, on the bundles' evaluation images (points, mean ± std over seeds). "
                  "'kept' is shown only where the FP32 gain is at least 1 point: a ratio of two small numbers says "
                  "nothing.", "",
                  "| dataset | variant | method | INT8 model | KD gain FP32 | KD gain INT8 | kept |",
                  "|---|---|---|---|---|---|---|"]
        for r in report.retention:
            g32, g8 = r["gain_fp32"], r["gain_int8"]
            kept = f"{100 * g8.mean / g32.mean:.0f}%" if abs(g32.mean) >= 0.01 else "-"
            lines.append(f"| {r['dataset']} | {r['variant']} | {r['method']} | {r['deployed']} | "
                         f"{100 * g32.mean:+.2f} ± {100 * g32.std:.2f} | {100 * g8.mean:+.2f} ± {100 * g8.std:.2f} | {kept} |")
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
    records = collect(study_root)
    if not records:
        raise EdgeKDError(f"no finished runs under {str(study_root)!r}: pass a study directory such as runs/quickstart")
    out = study_root / "report"
    out.mkdir(exist_ok=True)
    deploy = deploy_rows(study_root)
    report = Report(study_root, variant_rows(records), deploy, int8_retention(deploy))
    write_csv(out / "runs.csv", records)
    write_csv(out / "variants.csv", report.variants)
    write_csv(out / "deploy.csv", deploy)
    write_csv(out / "int8_retention.csv", report.retention)
    write_json(study_root / "summary.json", records)
    batches = sorted({r["batch"] for r in deploy})
    figures = {
        "kd_gain_by_factor": plots.kd_gain_by_factor(report.variants),
        "kd_gain_by_method": plots.method_gain_heatmap(report.variants),
        **{f"accuracy_vs_latency_b{b}": plots.accuracy_vs_latency(deploy, b) for b in batches[:1] + batches[-1:]},
        "int8_retention": plots.int8_retention(report.retention),
        "shift_curves": plots.shift_curves(report.variants),
    }
    figures = {k: v for k, v in figures.items() if v}
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    title = f"edgekd report: {study_root.name}"
    tables = _markdown_tables(report)
    md = [f"# {title}", "", "Test accuracy in %; students as mean ± std over seeds [95% interval]; KD gain is KD minus "
          "scratch paired by seed, negative where KD hurt.", "", *tables, ""]
    md += [f"![{name}]({name}.png)" for name in figures]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(title, tables, figures))
    report.files = {"md": out / "report.md", "html": out / "report.html", "csv": out / "variants.csv",
                    "deploy_csv": out / "deploy.csv"}
    return report


def _html(title: str, md_tables: list[str], figures: dict[str, bytes]) -> str:
    """A self-contained page: the markdown tables as HTML tables, the figures embedded as base64 PNG."""
    body, rows = [], []

    def flush():
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")
            rows.clear()

    for line in md_tables:
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        else:
            flush()
    flush()
    images = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     f"<figcaption>{name.replace('_', ' ')}</figcaption></figure>" for name, png in figures.items())
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:nth-child(-n+5){text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>Test accuracy in %; students as "
            "mean ± std over seeds [95% interval]; KD gain = KD − scratch, paired by seed.</p>"
            + "".join(body) + images + "</body></html>\n")
