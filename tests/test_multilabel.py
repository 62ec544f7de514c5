"""Multi-label data end to end on tiny real data: 2x2 mosaics of digits whose label set is the set of tile classes;
the losses and metrics against reference formulas; a distill study scored by macro AUC."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_profile_with

from edgekd.config import DatasetConfig, VariantConfig
from edgekd.errors import EdgeKDError


def test_mosaics_carry_the_set_of_their_tiles_classes():
    from edgekd.data.mosaic import make_mosaics
    from edgekd.data.types import ImageSet

    tiles = ImageSet(torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous() * 60,
                     torch.tensor([0, 1, 2, 3]))
    m = make_mosaics(tiles, 50, 5, seed=1)
    assert m.images.shape == (50, 1, 4, 4) and m.labels.shape == (50, 5) and m.labels.dtype == torch.uint8
    for image, labels in zip(m.images, m.labels, strict=True):
        quadrants = {int(image[0, y, x]) // 60 for y in (0, 2) for x in (0, 2)}  # each tile is one flat value
        assert set(labels.nonzero().flatten().tolist()) == quadrants
    assert not m.labels[:, 4].any()  # a class with no tiles is in no set
    assert torch.equal(make_mosaics(tiles, 50, 5, seed=1).images, m.images)


def test_mosaic_splits_from_digits_and_their_variants():
    from edgekd.data.splits import load_splits
    from edgekd.data.variants import apply_variant

    data = load_splits("m", DatasetConfig(source="mosaic", tiles="digits"))
    assert data.multilabel and data.train.labels.shape[1] == 10 and data.image_size == 16
    assert len(data.val) == round((len(data.train) + len(data.val)) * 0.1)
    assert 3 < float(data.test.labels.sum(1).float().mean()) < 4  # four tiles, repeats merged
    noisy = apply_variant(data, VariantConfig(kind="label_noise", rate=0.3)).splits
    changed = (noisy.train.labels != data.train.labels).any(1)
    assert abs(float(changed.float().mean()) - 0.3) < 0.01
    assert torch.equal(noisy.train.labels.sum(1), data.train.labels.sum(1))  # a swap keeps each set's size
    assert torch.equal(noisy.test.labels, data.test.labels)  # the test split is never changed
    assert len(apply_variant(data, VariantConfig(kind="fraction", fraction=0.25)).splits.train) == \
        round(len(data.train) * 0.25)
    with pytest.raises(EdgeKDError, match="needs one class per image.*multi-label"):
        apply_variant(data, VariantConfig(kind="imbalance", ratio=10))


def test_macro_auc_and_map_equal_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from edgekd.runtime.evalset import macro_auc, mean_average_precision

    rng = np.random.default_rng(0)
    labels = (rng.random((200, 6)) < 0.3).astype(np.uint8)
    labels[:, 5] = 0  # a class without positives counts in neither mean
    logits = np.round(labels * 1.5 + rng.standard_normal((200, 6)), 1)  # ties included
    assert macro_auc(logits, labels) == pytest.approx(roc_auc_score(labels[:, :5], logits[:, :5], average="macro"))
    assert mean_average_precision(logits, labels) == pytest.approx(
        average_precision_score(labels[:, :5], logits[:, :5], average="macro"))


def test_multilabel_losses_against_reference_formulas():
    from edgekd.distill.losses import ComposedLoss, StepOutputs
    from edgekd.distill.losses.logit import binary_kd_divergence

    torch.manual_seed(0)
    s, t = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3
    y = (torch.rand(8, 5) < 0.4).to(torch.uint8)
    loss = ComposedLoss({"ce": {}, "kd": {"temperature": 4.0}}, multilabel=True)
    parts = loss(StepOutputs(s, y, t))
    assert parts["ce"] == pytest.approx(float(F.binary_cross_entropy_with_logits(s, y.float(), reduction="sum")) / 8)
    # the BinaryKL reference: T^2 * (KL(p_t || p_s) + KL(1 - p_t || 1 - p_s)).sum() / N, on clamped probabilities
    T = 4.0
    ps, pt = torch.sigmoid(s / T).clamp(1e-8, 1 - 1e-8), torch.sigmoid(t / T).clamp(1e-8, 1 - 1e-8)
    reference = T**2 * (F.kl_div(ps.log(), pt, reduction="none") + F.kl_div((1 - ps).log(), 1 - pt, reduction="none")
                        ).sum() / 8
    assert parts["kd"] == pytest.approx(float(reference), rel=1e-5)
    assert float(binary_kd_divergence(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(EdgeKDError, match="loss 'dkd' needs one class per image"):
        ComposedLoss({"dkd": {}}, "methods.d", multilabel=True)


PROFILE = tiny_profile_with("""
[datasets.mosaic]
source = "mosaic"
tiles = "digits"
crop_padding = 1
hflip = false
""", """
[variants.base]
kind = "base"

[variants.noisy]
kind = "label_noise"
rate = 0.3

[explain]
images = 6

[deploy]
targets = ["onnx", "int8"]
int8_method = "ptq-search"
batch_sizes = [1, 4]
iters = 3
""", name="ml").replace("seeds = [0, 1]", "seeds = [0]")


def test_a_multilabel_study_is_scored_by_macro_auc_from_training_to_bench(tmp_path):
    import json

    from edgekd.config import load_profile
    from edgekd.runio import load_tensors
    from edgekd.runtime.evalset import macro_auc
    from edgekd.workflows import study

    (tmp_path / "ml.toml").write_text(PROFILE)
    study(load_profile(tmp_path / "ml.toml"), tmp_path / "runs")
    run = tmp_path / "runs" / "ml" / "mosaic" / "noisy" / "kd" / "seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "macro AUC" and 0.5 < metrics["test_acc"] <= 1.0
    assert set(metrics["per_class_test_auc"]) == {str(d) for d in range(10)} and "test_map" in metrics
    from edgekd.data.splits import load_splits

    test_labels = load_splits("mosaic", DatasetConfig(source="mosaic", tiles="digits", crop_padding=1,
                                                      hflip=False)).test.labels.numpy()
    logits = load_tensors(run / "predictions.safetensors")["test_logits"].numpy()
    assert metrics["test_acc"] == pytest.approx(macro_auc(logits, test_labels), abs=1e-5)
    best = max(metrics["history"], key=lambda h: h["val_acc"])  # the checkpoint is chosen by validation AUC
    assert metrics["best_epoch"] == best["epoch"]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["metric"] == "macro AUC" and manifest["multilabel"]
    fp32, int8 = manifest["models"]["onnx-fp32"], manifest["models"]["onnx-int8-cpu"]
    assert fp32["parity"]["ok"] and fp32["accuracy"] == pytest.approx(metrics["test_acc"], abs=1e-4)
    guard = int8["guard"]  # answers are per (image, class) decisions, clustered by image
    assert guard["scored"] == manifest["validation"]["scored"] and guard["steps"][0]["val_flips_pts"] >= 0
    bench = json.loads(next((run / "bundle").glob("bench-*.json")).read_text())
    scored = {r["model"]: r for r in bench["results"]}
    assert scored["onnx-fp32"]["metric"] == "macro AUC"
    assert scored["onnx-fp32"]["accuracy"] == pytest.approx(fp32["accuracy"], abs=1e-6)
    report = (tmp_path / "runs" / "ml" / "report" / "report.md").read_text()
    assert "'mosaic' is multi-label: its accuracies are macro AUC" in report
    explain = json.loads((tmp_path / "runs" / "ml" / "mosaic" / "base" / "explain" / "seed0" / "explain.json")
                         .read_text())
    assert explain["target"] == "each label the image has" and explain["images"] == 6
    assert explain["maps_per_model"] > 6  # one map per (image, label it has)
    kd = next(m for m in explain["models"].values() if m["role"] == "kd")
    assert set(kd["per_label_rank_corr"]) <= {str(d) for d in range(10)} and kd["per_label_rank_corr"]
    assert "Grad-CAM per label" in report


def test_the_int8_guard_counts_multilabel_answers_per_class_clustered_by_image(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgekd.export.int8 import validation_views
    from edgekd.export.quantize import Evaluator

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "id.onnx")
    x = np.array([[2, -1, 1], [-2, 3, -1], [1, 1, -3], [-1, -1, 2]], dtype=np.float32)
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    val = Evaluator(tmp_path / "id.onnx", x, labels, clusters=np.arange(4))
    assert val.fp32.accuracy == pytest.approx(11 / 12) and val.fp32.agreement == 1.0
    changed = x.copy()
    changed[0, 2] = -1  # one decision of image 0 flips (and becomes wrong)
    s = val.score_logits(changed)
    assert s.flips == pytest.approx(1 / 12) and s.drop(val.fp32) == pytest.approx(1 / 12)
    per_image = np.array([1 / 3, 0, 0, 0])  # the SE counts images, not decisions
    assert s.flips_se == pytest.approx(per_image.std(ddof=1) / 2)
    views, tiled, n = validation_views(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels[:2], 1, False, 6)
    assert n == 3 and tiled.shape == (6, 3) and (tiled[2:4] == labels[:2]).all()


def test_check_names_what_multilabel_data_cannot_do(tmp_path):
    from edgekd.check import check_profile

    (tmp_path / "p.toml").write_text(PROFILE + "\n[methods.d]\ndkd = { weight = 1.0 }\n[variants.s]\n"
                                               "kind = 'spurious'\n")
    problems = check_profile(tmp_path / "p.toml", deploy=True).problems
    assert any("'methods.d.dkd': loss 'dkd' needs one class per image" in p for p in problems)
    assert any("'variants.s.kind' is 'spurious'" in p for p in problems)
    assert not any("[explain]" in p for p in problems)  # Grad-CAM maps each label
    qat = check_profile(tmp_path / "p.toml", ["deploy.int8_compare=['qat-kd']"], deploy=True).problems
    assert any("qat-kd" in p for p in qat)


def test_a_label_set_list_reads_back_the_mosaics_it_lists(tmp_path):
    """Mosaics written as PNG files with a ChestX-ray14-style CSV (Image Index, Finding Labels, '|', No Finding) and
    as JSON come back as the same images and label sets."""
    import csv
    import json

    from PIL import Image

    from edgekd.data.mosaic import make_mosaics
    from edgekd.data.sources import SOURCES
    from edgekd.data.types import ImageSet

    tiles = ImageSet(torch.randint(0, 255, (12, 1, 4, 4), dtype=torch.uint8), torch.arange(12) % 3)
    mosaics = make_mosaics(tiles, 20, 4, seed=3)  # class 3 has no tiles: no image carries it
    names = ["cat", "dog", "fox", "owl"]
    (tmp_path / "cx" / "images").mkdir(parents=True)
    rows = []
    for i, (image, labels) in enumerate(zip(mosaics.images, mosaics.labels, strict=True)):
        Image.fromarray(image[0].numpy()).save(tmp_path / "cx" / "images" / f"{i}.png")
        found = [names[c] for c in labels.nonzero().flatten().tolist()]
        rows.append({"Image Index": f"{i}.png", "Finding Labels": "|".join(found) or "No Finding"})
    rows.append({"Image Index": "missing.png", "Finding Labels": "cat"})
    for split, part in (("train", rows[:14]), ("test", rows[14:])):
        with open(tmp_path / "cx" / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["Image Index", "Finding Labels"])
            w.writeheader()
            w.writerows(part)
    cfg = DatasetConfig(source="labelsets", data_dir=str(tmp_path / "cx"), image_size=8, channels=1)
    raw = SOURCES.get("labelsets").load(cfg)
    assert raw.classes == ["cat", "dog", "fox"]  # the labels the lists name, sorted
    assert torch.equal(raw.train.images, mosaics.images[:14]) and torch.equal(raw.test.images, mosaics.images[14:])
    assert torch.equal(raw.train.labels, mosaics.labels[:14, :3]) and torch.equal(raw.test.labels, mosaics.labels[14:, :3])
    assert any("skipped 1" in n for n in raw.notes)
    as_json = [{"path": f"images/{r['Image Index']}", "labels": r["Finding Labels"].split("|")} for r in rows[:-1]]
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "labels.json").write_text(json.dumps(as_json))
    (tmp_path / "js" / "images").symlink_to(tmp_path / "cx" / "images")
    held = SOURCES.get("labelsets").load(DatasetConfig(source="labelsets", data_dir=str(tmp_path / "js"),
                                                       image_size=8, channels=1))
    assert len(held.train) + len(held.test) == 20 and len(held.test) == 4  # 20% held out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels.csv").write_text("file,tags\na.png,x\n")
    with pytest.raises(EdgeKDError, match="needs a path column"):
        SOURCES.get("labelsets").load(DatasetConfig(source="labelsets", data_dir=str(tmp_path / "bad")))
