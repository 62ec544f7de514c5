"""Training throughput on Fashion-MNIST with augmentation on (random crop, padding 2, flip), batch 128.

Four loops, one run, same models (resnet18 teacher, mobilenetv3_small_100 student, timm's stock stems):
  scratch       edgekd's loop, student only
  kd-cached     edgekd's loop, teacher outputs from the view-keyed cache (filled beforehand; its cost is shown)
  kd-live       edgekd's loop, the teacher run on every batch under inference mode
  kd-baseline   torchvision DataLoader + PIL transforms, fp32, default memory format, teacher every step:
                the way most KD codebases train
images/s are of training steps only (validation excluded), measured on the second epoch of a capped train set.

    python benchmarks/train_throughput.py [--device cuda] [--images 6400] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

from edgekd.config import DatasetConfig, TrainConfig  # noqa: E402
from edgekd.data.augment import ViewAugment  # noqa: E402
from edgekd.data.splits import load_splits, stratified_cap  # noqa: E402
from edgekd.distill.execution import choose_execution, resolve_device  # noqa: E402
from edgekd.distill.losses import ComposedLoss, StepOutputs  # noqa: E402
from edgekd.distill.teacher import LiveTeacher, Normalize, TeacherCache  # noqa: E402
from edgekd.distill.train import train  # noqa: E402
from edgekd.models import create_model  # noqa: E402

KD = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}}


def edgekd_loop(data, cfg, ex, augment, criterion, teacher, epochs=2) -> float:
    torch.manual_seed(0)
    model = create_model(cfg.model, 10, 1, small_input=cfg.small_input)
    with tempfile.TemporaryDirectory() as tmp:
        history = train(model, data, cfg, criterion, ex, augment, seed=0, run_dir=Path(tmp), teacher=teacher,
                        log=lambda line: None)
    return history["history"][-1]["images_per_s"]


def baseline_loop(data, student_name, teacher_model, device, workers, steps, batch=128) -> float:
    """DataLoader + PIL transforms, fp32, contiguous, teacher forward every step."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class PILFashion(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images.squeeze(1).numpy(), labels.numpy()
            self.transform = transforms.Compose([
                transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                transforms.Normalize(data.mean, data.std)])

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(np.asarray(self.images[i]), mode="L")), int(self.labels[i])

    loader = DataLoader(PILFashion(data.train.images, data.train.labels), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    torch.manual_seed(0)
    student = create_model(student_name, 10, 1, small_input=False).to(device).train()
    teacher = teacher_model.to(device=device, memory_format=torch.contiguous_format).float().eval()
    criterion = ComposedLoss(KD)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    done, start = 0, None
    for epoch in range(100):
        for i, (x, y) in enumerate(loader):
            if epoch == 0 and i == 3:  # warm-up steps excluded
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start, done = time.perf_counter(), 0
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher(x)
            loss = criterion(StepOutputs(student(x), y, t))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += len(y)
            if start is not None and done >= steps * batch:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return done / (time.perf_counter() - start)
    raise RuntimeError("not enough data for the baseline steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=6400, help="training images per epoch (a stratified cap)")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to try for the baseline (best kept)")
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args()
    device = resolve_device(args.device)
    full = load_splits("fashion-mnist", DatasetConfig(source="fashion-mnist", data_dir=args.data_dir))
    data = full
    data.train = stratified_cap(full.train, args.images, 10, 0)
    data.val = stratified_cap(full.val, 512, 10, 0)
    augment = ViewAugment(2, True)
    student_cfg = TrainConfig(model="mobilenetv3_small_100", epochs=2, batch_size=128, lr=0.05, small_input=False)
    teacher_cfg = TrainConfig(model="resnet18", epochs=2, batch_size=128, small_input=False)
    shape = (128, 1, 28, 28)
    ex_s = choose_execution(lambda: create_model(student_cfg.model, 10, 1, small_input=False), student_cfg, device,
                            shape, 10)
    ex_t = choose_execution(lambda: create_model(teacher_cfg.model, 10, 1, small_input=False), teacher_cfg, device,
                            shape, 10)
    torch.manual_seed(1)
    teacher_model = create_model(teacher_cfg.model, 10, 1, small_input=False)
    live = LiveTeacher(teacher_model, ex_t)
    images = data.train.images.to(device)
    normalize = Normalize(data.mean, data.std, device)

    # The cache holds exactly the views the measured student will draw (seed 0, both epochs).
    cache = TeacherCache(len(data.train), augment.num_views, 10, device=device)
    cache.live = live
    start = time.perf_counter()
    filled = cache.fill(cache.plan(augment, [0], 2), images, augment, normalize, 512)
    fill_s = time.perf_counter() - start

    results = {
        "scratch": edgekd_loop(data, student_cfg, ex_s, augment, ComposedLoss({"ce": {}}), None),
        "kd-cached": edgekd_loop(data, student_cfg, ex_s, augment, ComposedLoss(KD), cache),
        "kd-live": edgekd_loop(data, student_cfg, ex_s, augment, ComposedLoss(KD), live),
    }
    steps = math.ceil(len(data.train) / 128) - 4
    baselines = {w: baseline_loop(data, student_cfg.model, teacher_model, device, w, steps)
                 for w in (int(w) for w in args.workers.split(","))}
    best_workers = max(baselines, key=baselines.get)
    results["kd-baseline"] = baselines[best_workers]
    base = results["kd-baseline"]
    rows = [[name, ips, results["scratch"] / ips, ips / base] for name, ips in results.items()]
    show(f"Training throughput, Fashion-MNIST, batch 128, {device} (student {ex_s}, teacher {ex_t})",
         ["loop", "images/s", "epoch time vs scratch", "speed vs baseline"], rows)
    print(f"teacher cache: {filled:,} (image, view) outputs in {fill_s:.1f} s, "
          f"shared by every student that distils from this teacher; baseline best with {best_workers} workers "
          f"({', '.join(f'{w}: {v:.0f} img/s' for w, v in baselines.items())})")
    kd_vs_scratch = results["scratch"] / results["kd-cached"]
    speedup = results["kd-cached"] / base
    print(f"KD (cached) epoch = {kd_vs_scratch:.3f}x a scratch epoch (goal <= 1.15); "
          f"KD (cached) = {speedup:.2f}x the DataLoader+PIL baseline (goal >= 3)")
    path = save("train_throughput", {
        "device": device, "images_per_epoch": len(data.train), "batch_size": 128,
        "student": {"model": student_cfg.model, "execution": str(ex_s)},
        "teacher": {"model": teacher_cfg.model, "execution": str(ex_t)},
        "images_per_s": results, "baseline_by_workers": baselines,
        "kd_cached_epoch_vs_scratch": round(kd_vs_scratch, 4), "kd_cached_vs_baseline": round(speedup, 3),
        "kd_live_vs_baseline": round(results["kd-live"] / base, 3),
        "cache_fill": {"outputs": filled, "seconds": round(fill_s, 2)},
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
