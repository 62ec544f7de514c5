"""The report as a person reads it: answers written from the intervals, "kept" only for positive gains, a "what
was run" section from the tool's own records, and report.html opened in headless Chromium (it renders; nothing
overflows the page)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgekd.records import Spread
from edgekd.report.sections import DASH, factor_answers, gain_verdict, kept_share


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# -- "kept" and the answers, from numbers alone --------------------------------------------------------------------
def test_kept_is_shown_only_for_positive_fp32_gains():
    assert kept_share(Spread(-0.0167, 0.01, 3), Spread(-0.025, 0.01, 3)) == DASH  # not "150%": a loss is not kept
    assert kept_share(Spread(0.005, 0.01, 3), Spread(0.004, 0.01, 3)) == DASH  # under 1 point: a ratio of noise
    assert kept_share(Spread(0.042, 0.01, 3), Spread(0.046, 0.01, 3)) == "110%"
    assert kept_share(Spread(0.042, 0.01, 3), Spread(-0.01, 0.01, 3)) == "none (KD now hurts)"  # not "-24%"


def test_the_retention_table_uses_the_kept_rule():
    from edgekd.report import Report, _markdown_tables

    retention = [{"dataset": "d", "variant": v, "method": "kd", "deployed": "onnx-int8-cpu", "gain_fp32": g32,
                  "gain_int8": g8, "seeds": 3, "gain_fp32_paired": g32}
                 for v, g32, g8 in (("lost", Spread(-0.0167, 0.01, 3), Spread(-0.025, 0.01, 3)),
                                    ("kept", Spread(0.10, 0.01, 3), Spread(0.09, 0.01, 3)))]
    lines = _markdown_tables(Report(Path("."), [], [], retention))
    lost = next(line for line in lines if line.startswith("| d | lost |"))
    assert lost.endswith(f"| {DASH} |") and "150%" not in lost
    assert next(line for line in lines if line.startswith("| d | kept |")).endswith("| 90% |")


def test_kept_divides_by_the_fp32_gain_on_the_seeds_int8_was_deployed_for():
    """Seed 1's scratch INT8 model was not deployed: the INT8 gain rests on seeds 0 and 2, so 'kept' divides by the
    FP32 gain of seeds 0 and 2 (+4 pts), not of all three (+10: seed 1's FP32 gain is +22); one deployed pair shows
    as one seed, not as a spread of zero."""
    from edgekd.report import Report, _markdown_tables, int8_retention

    fp32 = {("kd", 0): 0.74, ("kd", 1): 0.92, ("kd", 2): 0.74, ("scratch", 0): 0.70, ("scratch", 1): 0.70,
            ("scratch", 2): 0.70}
    deploy = [{"dataset": "d", "variant": "base", "role": role, "method": "kd" if role == "kd" else "", "seed": seed,
               "deployed": model, "accuracy": acc - (0.01 if "int8" in model and role == "kd" else 0)}
              for (role, seed), acc in fp32.items() for model in ("onnx-fp32", "onnx-int8-cpu")
              if not (model == "onnx-int8-cpu" and role == "scratch" and seed == 1)]
    failed = [{"dataset": "d", "variant": "base", "role": "scratch", "method": "", "seed": 1, "model": "onnx-int8-cpu"}]
    row = next(r for r in int8_retention(deploy, failed=failed))
    assert row["gain_int8"].n == 2 and row["not_deployed"] == 1 and row["not_deployed_by"] == {"kd": 0, "scratch": 1}
    assert row["gain_fp32"].mean == pytest.approx(0.10) and row["gain_fp32_paired"].mean == pytest.approx(0.04)
    line = next(x for x in _markdown_tables(Report(Path("."), [], [], [row])) if x.startswith("| d | base |"))
    assert line.endswith("| 75% |"), line  # +3 of +4 pts, not 30% of +10
    one = int8_retention([r for r in deploy if r["seed"] != 2], failed=failed)[0]
    assert "(1 seed)" in next(x for x in _markdown_tables(Report(Path("."), [], [], [one])) if x.startswith("| d |"))


def test_an_int8_model_refused_on_every_seed_keeps_its_row_with_no_gain():
    """Every scratch INT8 model refused: no seed pair, so no INT8 gain; both tables say so instead of failing."""
    from rich.console import Console

    from edgekd.cli import report_table
    from edgekd.report import Report, _markdown_tables, int8_retention

    deploy = [{"dataset": "d", "variant": "base", "role": role, "method": "kd" if role == "kd" else "", "seed": seed,
               "deployed": model, "accuracy": 0.8 if role == "kd" else 0.7}
              for role in ("kd", "scratch") for seed in (0, 1) for model in ("onnx-fp32", "onnx-int8-cpu")
              if not (model == "onnx-int8-cpu" and role == "scratch")]
    failed = [{"dataset": "d", "variant": "base", "role": "scratch", "method": "", "seed": s, "model": "onnx-int8-cpu"}
              for s in (0, 1)]
    rows = int8_retention(deploy, failed=failed)
    assert len(rows) == 1 and rows[0]["gain_int8"] is None and rows[0]["not_deployed_by"] == {"kd": 0, "scratch": 2}
    line = next(x for x in _markdown_tables(Report(Path("."), [], [], rows)) if x.startswith("| d | base |"))
    assert "no deployed pair" in line and "2 seed(s): KD 0, scratch 2" in line
    console = Console(width=200, record=True)
    console.print(report_table(Report(Path("study"), [], [], rows)))
    assert "no deployed pair (FP32 +10.00, 2 seed(s) not deployed)" in console.export_text()


def _rows(gains: dict[str, list[float]], teacher: float = 0.95) -> list[dict]:
    """variant_rows of a study whose KD students beat scratch by the given per-seed gains."""
    from edgekd.report.tables import variant_rows

    kinds = {"noise30": "label_noise", "size10": "fraction", "longtail": "imbalance", "base": "base"}
    records = [{"dataset": "fm", "variant": "base", "role": "teacher", "method": "", "seed": 0, "model": "t",
                "test_acc": teacher, "kind": "base"}]
    for variant, per_seed in gains.items():
        for seed, gain in enumerate(per_seed):
            for role, method, acc in (("scratch", "", 0.70), ("kd", "kd", 0.70 + gain)):
                records.append({"dataset": "fm", "variant": variant, "role": role, "method": method, "seed": seed,
                                "model": "m", "test_acc": acc, "kind": kinds[variant]})
    return variant_rows(records)


def test_answers_say_what_the_intervals_allow():
    rows = _rows({"noise30": [0.10, 0.11, 0.103], "size10": [0.03, -0.02, 0.01], "longtail": [-0.03, -0.031, -0.029]})
    paragraphs = [p for p in factor_answers(rows, {("fm", "noise30"): "30% symmetric label noise"}) if p]
    assert len(paragraphs) == 3  # one per factor
    noise, size, imbalance = paragraphs
    assert noise.startswith("**label noise**: noise30 (30% symmetric label noise) — m: KD +10.43 points [+")
    assert noise.endswith("3 seeds (paired bootstrap [+10.00, +11.00]): a gain distinguishable from zero, the largest such gain.")
    assert size.startswith("**size**: size10 — m: KD +0.67 points [-") and "not distinguishable from zero" in size
    assert "largest" not in size
    assert "KD -3.00 points [" in imbalance and "KD hurts, distinguishably from zero" in imbalance  # a negative gain
    assert "warning" not in " ".join(paragraphs)  # the teacher (95%) beats every student


def test_answers_for_many_methods_sort_them_by_what_the_intervals_allow():
    from edgekd.report.tables import variant_rows

    records = [{"dataset": "fm", "variant": "base", "role": "teacher", "method": "", "seed": 0, "model": "t",
                "test_acc": 0.95, "kind": "base"}]
    gains = {"rkd": [0.05, 0.06, 0.055], "sp": [0.04, -0.03, 0.01], "dist": [-0.02, -0.021, -0.019]}
    for seed in range(3):
        records.append({"dataset": "fm", "variant": "pc100", "role": "scratch", "method": "", "seed": seed,
                        "model": "m", "test_acc": 0.70, "kind": "per_class"})
        records += [{"dataset": "fm", "variant": "pc100", "role": "kd", "method": m, "seed": seed, "model": "m",
                     "test_acc": 0.70 + g[seed], "kind": "per_class"} for m, g in gains.items()]
    (answer, _) = factor_answers(variant_rows(records))
    assert answer.startswith("**size**: pc100 — m, KD gain in points [95% interval] over 3 seeds — ")
    assert "distinguishable gains: rkd +5.50 [+4.26, +6.74] (the largest such gain); " in answer
    assert "distinguishable losses: dist -2.00 [" in answer
    assert answer.endswith("not distinguishable from zero: sp +0.67 [-8.06, +9.39].")


def test_answers_with_one_seed_have_no_interval_and_flag_a_weak_teacher():
    (answer, _) = factor_answers(_rows({"noise30": [0.05]}, teacher=0.72))
    assert "KD +5.00 points from one seed: no interval, so it cannot be told from zero" in answer
    assert "[" not in answer  # no interval is invented from one seed
    assert "warning: the teacher, 72.00%, is no better than these students, 75.00%" in answer
    assert gain_verdict(Spread(0.02, 0.0, 1)).endswith("cannot be told from zero")


def test_the_teachers_table_warns_when_the_teacher_is_no_better_than_its_students():
    from edgekd.report.sections import _teacher_section

    rows = _rows({"noise30": [0.05, 0.06]}, teacher=0.74)
    teacher = {"dataset": "fm", "variant": "base", "role": "teacher", "family": "", "model": "t", "test_acc": 0.74}
    (line,) = [x for x in _teacher_section([teacher], rows) if x.startswith("| fm |")]
    assert line == "| fm | t | base | 74.00 | 75.50 (kd, m, noise30) | **warning: no better than its students** (-1.50 points) |"


def test_cpu_flags_keep_the_speed_relevant_ones():
    from edgekd.envinfo import cpu_flags

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx_vnni amx_tile amx_int8 aes\n"
    assert cpu_flags(x86) == ["amx_int8", "amx_tile", "avx", "avx2", "avx512_vnni", "avx512f", "avx_vnni", "fma"]
    arm = "Features\t: fp asimd evtstrm aes asimdhp asimddp i8mm\n"
    assert cpu_flags(arm) == ["dotprod", "fp16", "i8mm", "neon"]
    assert cpu_flags("") == []


# -- a real report of a tiny study ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reported_study(tiny_study, tiny_bundle, tmp_path_factory):
    """A copy of the tiny study with both students of seed 0 exported and benched, and its report built."""
    from edgekd.bench.harness import BenchOptions, bench_bundle, save_bench
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.report import build_report

    root = tmp_path_factory.mktemp("reported") / "tiny"
    shutil.copytree(tiny_study, root, ignore=shutil.ignore_patterns("report", "bench-*.json"))
    for role in ("scratch", "kd"):
        bundle = export_run(root / "synthetic" / "base" / role / "seed0",
                            ExportOptions(targets=("onnx", "int8"), calib_size=64, int8_max_drop=100.0), log=lambda line: None)
        save_bench(bench_bundle(bundle, BenchOptions(batch_sizes=(1, 2), iters=3, warmup=1, threads=1)))
    build_report(root)
    return root


def test_the_tool_records_its_own_phase_times(reported_study):
    bundle = reported_study / "synthetic" / "base" / "kd" / "seed0" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["export_s"] > 0
    bench = json.loads((bundle / "bench-ort-cpu.json").read_text())
    assert bench["wall_s"] > 0 and "cpu_flags" in bench["environment"]


def test_report_says_what_was_run(reported_study):
    md = (reported_study / "report" / "report.md").read_text()
    assert md.index("## Answers") < md.index("## Results") < md.index("## What was run")
    assert "**clean**: base (the data as it is) — test_efficientnet: KD " in md
    assert "from one seed: no interval" in md  # the tiny study has one seed
    data = next(line for line in md.splitlines() if line.startswith("| synthetic | base | the data as it is |"))
    cells = [c.strip() for c in data.strip("|").split("|")]
    assert cells[4:] == ["4", "1×12×12", "144", "16", "40", "36 each", "0"]  # classes, image, splits, skipped
    assert "Classes of synthetic: bar0, bar1, bar2, bar3." in md
    assert "| synthetic | test_resnet | base |" in md  # the teacher, checked against its students
    assert "| student (kd, scratch) | 2 | test_efficientnet |" in md and "| teacher | 1 | test_resnet |" in md
    assert "- kd: ce (weight 0.5) + kd (weight 0.5, temperature 2)" in md
    assert "speed-relevant CPU flags:" in md and "not recorded (benched before" not in md
    times = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith(("| distill |",
                                                                                               "| export |", "| bench |"))}
    assert set(times) == {"distill", "export", "bench"} and "Summed job times" in md
    assert "| 2 bundles |" in times["export"] and "| 2 bench files |" in times["bench"]
    assert "not recorded" not in "".join(times.values())
    cold = [line for line in md.splitlines() if line.startswith("| synthetic | ort/cpu |")]
    assert "Cold start beside warm latency" in md and {c.split("|")[4].strip() for c in cold} >= {"onnx-fp32"}


OVERFLOW_CHECK = """<script>
window.addEventListener("load", function () {
  var width = document.documentElement.clientWidth, wide = [];
  document.querySelectorAll("body *").forEach(function (e) {
    var r = e.getBoundingClientRect();
    if (r.width > 0 && (r.right > width + 1 || r.left < -1)) {
      wide.push(e.tagName + " " + Math.round(r.right) + ": " + (e.getAttribute("alt") || e.textContent).slice(0, 80));
    }
  });
  var out = document.createElement("pre");
  out.id = "overflow-check";
  out.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth, width: width,
                                    images: Array.from(document.images).map(function (i) { return i.naturalWidth; }),
                                    overflowing: wide});
  document.body.appendChild(out);
});
</script></body>"""


def _chromium_run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout)


def _layout(page: Path, width: int) -> dict:
    checked = page.with_name(f"checked-{width}.html")
    checked.write_text(page.read_text().replace("</body>", OVERFLOW_CHECK))
    result = _chromium_run([f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom",
                            checked.as_uri()])
    assert result.returncode == 0, result.stderr[-2000:]
    start = result.stdout.index('<pre id="overflow-check">') + len('<pre id="overflow-check">')
    import html

    return json.loads(html.unescape(result.stdout[start:result.stdout.index("</pre>", start)]))


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (apt-get install -y chromium): the HTML is not "
                                                "opened in a browser")
def test_report_html_renders_in_chromium_without_overflow(reported_study, tmp_path):
    from PIL import Image

    page = reported_study / "report" / "report.html"
    shot = tmp_path / "report.png"
    result = _chromium_run([f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()])
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    histogram = image.histogram()
    assert sum(1 for n in histogram if n) > 32 and max(histogram) < 0.97 * sum(histogram)  # text and plots, not blank

    wide = _layout(page, 1280)  # a desktop window: nothing sticks out of the page
    assert len(wide["images"]) >= 3 and all(w > 0 for w in wide["images"]), wide  # every figure decoded
    assert wide["overflowing"] == [] and wide["scrollWidth"] <= wide["width"], wide
    narrow = _layout(page, 700)  # a narrow one: wide tables scroll inside their box, the page does not
    assert narrow["scrollWidth"] <= narrow["width"], narrow


def test_a_tuned_method_lists_its_setting_per_variant_and_no_grid_candidates():
    from edgekd.report.sections import _training_section

    def setup(variant, method, weight):
        return ({"role": "kd", "method": method, "variant": variant, "epochs": 8},
                {"train": {"model": "m", "epochs": 8}, "losses": {"ce": {"weight": 1.0}, "fitnet": {"weight": weight}}})

    lines = _training_section([setup("pc100", "fitnet~0", 1.0), setup("pc100", "fitnet", 10.0),
                               setup("pc500", "fitnet", 1.0), setup("pc1000", "fitnet", 1.0)])
    assert [x for x in lines if x.startswith("- ")] == [
        "- fitnet (pc100): ce (weight 1) + fitnet (weight 10)",
        "- fitnet (pc500, pc1000): ce (weight 1) + fitnet (weight 1)"]
