"""The report's figures, as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"clean": "#4c72b0", "size": "#55a868", "imbalance": "#c44e52", "label noise": "#8172b2",
          "spurious bias": "#ccb974", "domain shift": "#64b5cd", "class subset": "#8c8c8c",
          "labeled fraction": "#dd8452"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # bbox "tight": a label or title that still sticks out widens the image instead of being cut at its edge
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buf.getvalue()


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Text broken into lines that fit `width_in` inches at `fontsize` points (about 0.55 em per character)."""
    chars = max(16, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _title(ax, text: str, fontsize: float = 10) -> None:
    """An axes title wrapped to the axes' width: a long title is never cut at the image's edge."""
    width = ax.figure.get_figwidth() * ax.get_position().width
    ax.set_title(_wrap(text, width, fontsize), fontsize=fontsize)


def _suptitle(fig, text: str, fontsize: float = 10) -> None:
    fig.suptitle(_wrap(text, 0.95 * fig.get_figwidth(), fontsize), fontsize=fontsize)


def kd_gain_by_factor(rows: list[dict]) -> bytes | None:
    rows = [r for r in rows if r["gain"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    several = len({r["dataset"] for r in rows}) > 1
    labels = [(f"{r['dataset']}\n" if several else "") + f"{r['variant']}\n{r['student']}\n{r['method']}"
              for r in rows]
    x = range(len(rows))
    means = [100 * r["gain"].mean for r in rows]
    ax.bar(x, means, color=[COLORS.get(r["factor"], "#999999") for r in rows])
    # Thin whiskers: the 95% interval (wide with few seeds); thick ones: the std over seeds.
    ax.errorbar(x, means, yerr=[100 * r["gain"].ci95 for r in rows], fmt="none", ecolor="black", capsize=4,
                linewidth=0.8)
    ax.errorbar(x, means, yerr=[100 * r["gain"].std for r in rows], fmt="none", ecolor="black", linewidth=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("KD gain (points of test accuracy)")
    _title(ax, "KD gain by dataset factor\nmean over seeds; thick bar: ± std, thin whisker: 95% interval", 10)
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=COLORS.get(f, "#999999")) for f in factors], factors, fontsize=8,
              loc="best")
    return _png(fig)


def method_gain_heatmap(rows: list[dict]) -> bytes | None:
    """Methods x variants, coloured by KD gain (diverging around zero), each cell annotated mean ± std."""
    rows = [r for r in rows if r["gain"] is not None]
    methods = sorted({r["method"] for r in rows})
    if len(methods) < 2:
        return None
    columns = sorted({(r["dataset"], r["variant"], r["student"]) for r in rows})
    cell = {(r["method"], (r["dataset"], r["variant"], r["student"])): r["gain"] for r in rows}
    grid = [[100 * cell[m, c].mean if (m, c) in cell else float("nan") for c in columns] for m in methods]
    span = max((abs(v) for line in grid for v in line if v == v), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(2.2 * len(columns) + 2.5, 0.45 * len(methods) + 1.8))
    image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    for i, m in enumerate(methods):
        for j, c in enumerate(columns):
            if (m, c) in cell:
                g = cell[m, c]
                text = f"{100 * g.mean:+.2f} ± {100 * g.std:.2f}" if g.n > 1 else f"{100 * g.mean:+.2f} (1 seed)"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if abs(100 * g.mean) > 0.6 * span else "black")
    ax.set_xticks(range(len(columns)), [f"{d}\n{v}\n{s}" for d, v, s in columns], fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=9)
    fig.colorbar(image, ax=ax, label="KD gain over scratch (points)")
    _title(ax, "KD gain by method and dataset variant (mean ± std over seeds)", 10)
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front, best = [], -1.0
    for latency, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((latency, acc))
            best = acc
    return front


def latency_panels(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (variant, device, timing kind): what may share one latency axis. Each named bench device (the
    profile's [devices]) is a device of its own: a Jetson's milliseconds are not a server's."""
    panels = defaultdict(list)
    for r in rows:
        where = f"{r['device_name']} ({r['device']})" if r.get("device_name") else r["device"]
        panels[(r["variant"], where, r.get("timing", "host_wall"))].append(r)
    return dict(panels)


def accuracy_vs_latency(deploy: list[dict], batch: int) -> bytes | None:
    """One panel per (variant, device and clock): a host-clock latency and a CUDA-event latency are different
    quantities, and a model benched on a device it is not made for (the TensorRT INT8 preset on a CPU) is left
    out of the front and counted in the panel's title."""
    rows = [r for r in deploy if r["batch"] == batch]
    if not rows:
        return None
    panels = latency_panels(rows)
    keys = sorted(panels)
    cpus = {r["cpu"] for r in rows}
    on = f" ({next(iter(cpus))[:40]})" if len(cpus) == 1 else ""  # several devices: each panel names its own
    cols = min(2, len(keys))  # two panels a line: at the report's width their labels stay readable
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 4.4 * nrows), squeeze=False)
    markers = {"scratch": "o"}
    for ax, key in zip(axes.flat, keys, strict=False):
        variant, device, timing = key
        shown = [r for r in panels[key] if r.get("meant_for_device", True)]
        groups = defaultdict(list)
        several = len({r["backend"] for r in shown}) > 1  # one file on two runtimes: two points to tell apart
        for r in shown:
            runtime = f"{r['backend']} " if several else ""
            groups[(f"{runtime}{r['deployed']}", r["role"] if r["role"] == "scratch" else r["method"])].append(r)
        for (deployed, who), rs in sorted(groups.items()):
            ax.scatter([r["p50_ms"] for r in rs], [100 * r["accuracy"] for r in rs], label=f"{deployed} / {who}",
                       marker=markers.get(who, "^"), alpha=0.8)
        if shown:
            front = pareto_front([(r["p50_ms"], 100 * r["accuracy"]) for r in shown])
            ax.plot(*zip(*front, strict=True), color="black", linewidth=1, linestyle="--", label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        clock = "CUDA events" if timing == "device_events" else "host clock"
        ax.set_xlabel(f"p50 latency, batch {batch} (ms, {clock}, log)", fontsize=9)
        ax.set_ylabel("accuracy on the eval set (%)", fontsize=9)
        ax.tick_params(labelsize=8, which="both")
        left_out = len({r["deployed"] for r in panels[key]} - {r["deployed"] for r in shown})
        note = f"\n{left_out} model kind(s) not made for {device} left out" if left_out else ""
        cpu = {r["cpu"] for r in panels[key]}
        machine = f", {next(iter(cpu))[:32]}" if len(cpus) > 1 and len(cpu) == 1 else ""
        _title(ax, f"{variant} on {device}{machine}{note}", 10)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    _suptitle(fig, f"Accuracy against latency per model kind, batch {batch}{on}", 11)
    fig.tight_layout()
    return _png(fig)


def int8_retention(retention: list[dict]) -> bytes | None:
    if not retention:
        return None
    groups = sorted({(r["dataset"], r["variant"], r["method"]) for r in retention})
    models = sorted({r["deployed"] for r in retention})
    width = 0.8 / (len(models) + 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4))
    bars = [("FP32 (ONNX)", "gain_fp32", None)] + [(m, "gain_int8", m) for m in models]
    for j, (label, key, model) in enumerate(bars):
        xs, ys, errs = [], [], []
        for i, g in enumerate(groups):
            row = next((r for r in retention if (r["dataset"], r["variant"], r["method"]) == g
                        and (model is None or r["deployed"] == model)), None)
            if row and row[key] is not None:  # no deployed INT8 model on any seed: nothing to draw
                xs.append(i + (j - len(models) / 2) * width)
                ys.append(100 * row[key].mean)
                errs.append(100 * row[key].std)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=2, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f"{d}\n{v}\n{m}" for d, v, m in groups], fontsize=8)
    ax.set_ylabel("KD gain (points, ± std over seeds)")
    _title(ax, "How much of the KD gain survives INT8 quantization", 10)
    ax.legend(fontsize=8)
    return _png(fig)


def compression_ladder(ladder: list[dict]) -> bytes | None:
    """Accuracy against p50 latency at the largest batch for each stage of a compression ladder, the stages of one
    (variant, method, runner) joined in ladder order, each point labelled with its stage and parameters."""
    rows = [r for r in ladder if r["accuracy"] and r["p50_ms"]]
    if not rows:
        return None
    lines = defaultdict(list)
    for r in rows:
        lines[(r["dataset"], r["variant"], r["method"], r["runner"])].append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (dataset, variant, method, runner), stages in sorted(lines.items()):
        batch = max(stages[0]["p50_ms"])
        xs = [s["p50_ms"][batch] for s in stages]
        ys = [100 * s["accuracy"].mean for s in stages]
        ax.plot(xs, ys, "-o", label=f"{dataset} {variant} {method} ({runner}, batch {batch})")
        for s, x, y in zip(stages, xs, ys, strict=True):
            params = f", {s['params'] / 1e6:.2f}M" if s.get("params") else ""
            ax.annotate(f"{s['stage']}{params}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel("accuracy on the bundle's evaluation images (%)")
    _title(ax, "Compression ladder: what each stage costs in accuracy and buys in latency", 10)
    ax.legend(fontsize=7)
    return _png(fig)


def gradcam_grid(maps_file: Path, title: str) -> bytes | None:
    """A few test images of a variant beside the Grad-CAM maps of the teacher and the first seed's scratch and KD
    students (edgekd/explain.py's maps.npz), each map over its image."""
    import numpy as np

    try:
        data = np.load(maps_file)
    except (OSError, ValueError):
        return None
    images = data["images"]
    columns = [k for k in data.files if k.startswith("map:teacher")] + sorted(
        k for k in data.files if k.startswith("map:") and not k.startswith("map:teacher"))
    fig, axes = plt.subplots(len(images), 1 + len(columns), figsize=(1.6 * (1 + len(columns)), 1.6 * len(images)),
                             squeeze=False)
    for i, image in enumerate(images):
        gray = image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1 else image.transpose(1, 2, 0)
        axes[i, 0].imshow(gray, cmap="gray" if gray.ndim == 2 else None)
        if "targets" in data.files:  # the class each row's maps explain (several per image when multi-label)
            axes[i, 0].text(0, -0.5, str(data["targets"][i]), fontsize=7, va="bottom")
        for j, key in enumerate(columns, start=1):
            axes[i, j].imshow(gray, cmap="gray" if gray.ndim == 2 else None)
            axes[i, j].imshow(data[key][i], cmap="jet", alpha=0.5)
        if i == 0:
            axes[0, 0].set_title("image", fontsize=8)
            for j, key in enumerate(columns, start=1):
                _, role, method = key.split(":")
                axes[0, j].set_title(method or role, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    _suptitle(fig, title, 9)
    return _png(fig)


def shift_curves(rows: list[dict]) -> bytes | None:
    """One line of panels per (variant, student, method) with corrupted test sets: accuracy against severity,
    severity 0 being the clean test set, scratch against KD."""
    rows = [r for r in rows if r.get("kd_shift")]
    if not rows:
        return None
    kinds = sorted({name.split("@")[0] for r in rows for name in r["kd_shift"]})
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(3 * len(kinds), 2.8 * len(rows)), squeeze=False)
    for line, row in zip(axes, rows, strict=True):
        for ax, kind in zip(line, kinds, strict=True):
            for who, style in (("scratch", "o-"), ("kd", "^-")):
                points = [(0, row[f"{who}_acc"].mean)] + sorted(
                    (int(n.split("@")[1]), s.mean) for n, s in row[f"{who}_shift"].items() if n.startswith(kind + "@"))
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], style,
                        label="scratch" if who == "scratch" else row["method"])
            _title(ax, f"{kind}: {row['variant']}, {row['student']}", 8)
            ax.set_xlabel("severity (0 = clean)", fontsize=8)
        line[0].set_ylabel("test accuracy (%)")
        line[0].legend(fontsize=8)
    _suptitle(fig, "Accuracy under test-time corruption, scratch vs KD (mean over seeds)", 10)
    return _png(fig)
