"""Audio as images: class-per-folder WAV clips become one-channel log-mel spectrograms or MFCCs (torchaudio), stored
as uint8 like every image source, so views, the teacher cache, export, INT8 and the torch-free bench take the
feature map unchanged (a bundle's model input is the spectrogram, not the waveform).

Each clip is read (PCM WAV, standard library), mixed to mono, resampled to `sample_rate`, centre-padded with
silence or centre-cropped to `clip_seconds`, given white noise at `snr_db` if set (seeded by its file name), and
turned into `image_size` mel bands x `image_size` frames:
- logmel: power in dB relative to the clip's loudest bin, floored at -TOP_DB (librosa's and torchaudio's
  `top_db` convention), mapped linearly from [-TOP_DB, 0] dB to [0, 255]. Loudness-invariant by construction, so
  the uint8 map needs no statistics of the data.
- mfcc: the DCT-II (orthonormal) of that dB spectrogram, `image_size` coefficients per frame; each coefficient
  row mapped to [0, 255] by the 0.5th-99.5th percentiles of the source's training clips (recorded in the cache,
  clipped outside), since coefficient ranges differ by orders of magnitude.
torchaudio rather than librosa: `benchmarks/audio_features.py` measures both (install size, import time, clips/s).

Features are computed once per (files, settings) and cached as safetensors under $EDGEKD_FEATURE_CACHE (default
~/.cache/edgekd/features), keyed by every file's path, size and modification time and the settings: a changed,
added or removed clip recomputes them, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import wave
from pathlib import Path

import numpy as np
import torch

from edgekd.config import DatasetConfig
from edgekd.data.imagefolder import FolderLayout, folder_layout
from edgekd.data.sampling import HOLDOUT_FRACTION, HOLDOUT_SEED, holdout_sizes, stratified_holdout
from edgekd.data.types import ImageSet, RawDataset, SourceSizes
from edgekd.errors import EdgeKDError
from edgekd.runio import load_tensors, save_tensors

log = logging.getLogger("edgekd.data")

AUDIO_SUFFIXES = {".wav"}
FEATURES = ("logmel", "mfcc")
DEFAULT_SIZE = 32  # 32 mel bands x 32 frames: about a 31 ms hop over one second
TOP_DB = 80.0
MFCC_PERCENTILES = (0.5, 99.5)
# Part of every cache key: raised when the features of the same files and settings would change.
FEATURES_REVISION = 1


def audio_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file as float32 mono in [-1, 1] and its sample rate. Raises ValueError for anything else."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable PCM WAV file ({exc})") from None
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = ((b[:, 0].astype(np.int32) | b[:, 1].astype(np.int32) << 8 | b[:, 2].astype(np.int32) << 16) << 8
             ).astype(np.float32) / 2**31
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported (use 8, 16, 24 or 32-bit PCM)")
    if len(x) < channels or rate <= 0:
        raise ValueError(f"{path}: no samples")
    x = x[: len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    return x, rate


def fixed_length(x: torch.Tensor, samples: int) -> torch.Tensor:
    """Centre-crop, or centre-pad with silence, to `samples`."""
    if len(x) >= samples:
        start = (len(x) - samples) // 2
        return x[start : start + samples]
    left = (samples - len(x)) // 2
    return torch.nn.functional.pad(x, (left, samples - len(x) - left))


class FeatureMaker:
    """One dataset's feature settings: waveform -> `size` x `size` float feature map (dB or MFCC)."""

    def __init__(self, cfg: DatasetConfig):
        import torchaudio

        if cfg.features not in FEATURES:
            raise EdgeKDError(f"unknown audio features {cfg.features!r}: use {' or '.join(FEATURES)}")
        self.size = cfg.image_size or DEFAULT_SIZE
        self.rate, self.kind, self.snr_db = cfg.sample_rate, cfg.features, cfg.snr_db
        self.samples = max(1, round(cfg.sample_rate * cfg.clip_seconds))
        self.hop = max(1, self.samples // self.size)  # frames = samples // hop + 1 > size, cropped to size
        n_fft = 1 << max(8, (2 * self.hop - 1).bit_length())  # a power of two covering two hops, at least 256
        self.mel = torchaudio.transforms.MelSpectrogram(cfg.sample_rate, n_fft=n_fft, hop_length=self.hop,
                                                        n_mels=self.size, power=2.0)
        self.dct = torchaudio.functional.create_dct(self.size, self.size, norm="ortho")
        self._resamplers: dict[int, torch.nn.Module] = {}
        self._torchaudio = torchaudio

    def settings(self) -> dict:
        return {"features": self.kind, "sample_rate": self.rate, "samples": self.samples, "size": self.size,
                "hop": self.hop, "n_fft": self.mel.n_fft, "top_db": TOP_DB, "snr_db": self.snr_db,
                "revision": FEATURES_REVISION}

    def noisy(self, x: torch.Tensor, length: int, seed: int) -> torch.Tensor:
        """`x` (a fixed-length clip whose first `length` samples, centred, are the recording) with white noise at
        snr_db below the recording's mean power, over the whole clip, drawn from `seed`."""
        power = float((x**2).sum()) / max(1, length)
        std = (power / 10 ** (self.snr_db / 10)) ** 0.5
        noise = torch.randn(len(x), generator=torch.Generator().manual_seed(seed))
        return x + std * noise

    def __call__(self, clips: list[tuple[np.ndarray, int]], chunk: int = 256,
                 seeds: list[int] | None = None) -> torch.Tensor:
        """[N, size, size] features of (waveform, rate) clips, computed in batches (a clip at a time is ~30x
        slower: resampling and the STFT are small convolutions). A batch is zero-padded at the end to its longest
        clip, resampled, and each clip cut back to its own resampled length: the same samples as one by one.
        `seeds`: one per clip, for its background noise (snr_db); default: its position."""
        if self.snr_db is not None:
            seeds = seeds if seeds is not None else list(range(len(clips)))
        out = []
        for start in range(0, len(clips), chunk):
            waves = []
            for rate in sorted({r for _, r in clips[start : start + chunk]}):
                group = [x for x, r in clips[start : start + chunk] if r == rate]
                batch = torch.zeros(len(group), max(len(x) for x in group))
                for i, x in enumerate(group):
                    batch[i, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.float32))
                if rate != self.rate:
                    if rate not in self._resamplers:
                        self._resamplers[rate] = self._torchaudio.transforms.Resample(rate, self.rate)
                    batch = self._resamplers[rate](batch)
                lengths = [-(-len(x) * self.rate // rate) for x in group]
                for i, b, n in zip([j for j, (_, r) in enumerate(clips[start : start + chunk]) if r == rate],
                                   batch, lengths, strict=True):
                    clip = fixed_length(b[:n], self.samples)
                    if self.snr_db is not None:
                        clip = self.noisy(clip, min(n, self.samples), seeds[start + i])
                    waves.append((i, clip))
            waves.sort(key=lambda pair: pair[0])  # back in the clips' order
            power = self.mel(torch.stack([w for _, w in waves]))[:, :, : self.size]  # [n, mels, frames]
            db = 10 * torch.log10(power.clamp_min(1e-10))
            db = (db - db.amax(dim=(1, 2), keepdim=True)).clamp_min(-TOP_DB)  # relative to the loudest bin
            out.append(db if self.kind == "logmel" else (db.transpose(1, 2) @ self.dct).transpose(1, 2))
        return torch.cat(out) if out else torch.zeros(0, self.size, self.size)


def to_uint8(features: torch.Tensor, kind: str, ranges: torch.Tensor | None = None) -> torch.Tensor:
    """[N, size, size] float features -> [N, 1, size, size] uint8 (see the module docstring)."""
    if kind == "logmel":
        x = (features + TOP_DB) * (255.0 / TOP_DB)
    else:
        lo, hi = ranges[0].view(1, -1, 1), ranges[1].view(1, -1, 1)
        x = (features - lo) * (255.0 / (hi - lo).clamp_min(1e-6))
    return x.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


def mfcc_ranges(features: torch.Tensor) -> torch.Tensor:
    """Per coefficient row, the training clips' MFCC_PERCENTILES: [2, size] (low, high)."""
    rows = features.transpose(0, 1).reshape(features.shape[1], -1).double()
    q = torch.tensor([p / 100 for p in MFCC_PERCENTILES], dtype=torch.float64)
    return torch.quantile(rows, q, dim=1).float()


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEKD_FEATURE_CACHE") or Path.home() / ".cache" / "edgekd" / "features").expanduser()


def _listing(layout: FolderLayout, root: Path) -> list[tuple[str, list[tuple[Path, int]]]]:
    """(split, [(file, label)]) for each split the folder has: train and test, or one 'all' to hold out from."""
    splits = [("train", layout.split_dirs[0]), ("test", layout.split_dirs[1])] if layout.split_dirs else [("all", root)]
    return [(name, [(p, label) for label, c in enumerate(layout.classes) for p in audio_files(folder / c)])
            for name, folder in splits]


def folder_audio_sizes(root: Path) -> SourceSizes:
    """Clips per class and split, from the file listing alone (unreadable files are found at load)."""
    layout = folder_layout(root, "audiofolder", "audio clips (.wav)")
    counts = {name: torch.bincount(torch.tensor([label for _, label in files], dtype=torch.int64),
                                   minlength=len(layout.classes)) for name, files in _listing(layout, root)}
    if "all" in counts:
        counts["train"], counts["test"] = holdout_sizes(counts.pop("all"))
    if int(counts["train"].sum()) + int(counts["test"].sum()) == 0:
        raise EdgeKDError(f"audiofolder: no .wav files in the class folders of {str(layout.class_root)!r}: add "
                          "PCM WAV clips, one folder per class")
    return SourceSizes(layout.classes, counts["train"], counts["test"])


def load_audio_folder(root: Path, cfg: DatasetConfig, progress=None) -> RawDataset:
    """The folder's clips as uint8 feature maps, from the feature cache when it holds these files and settings.
    `progress(done, total)`, if given, is called while features are computed."""
    layout = folder_layout(root, "audiofolder", "audio clips (.wav)")
    listing = _listing(layout, root)
    maker = FeatureMaker(cfg)
    stamp = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns, label)
             for _, files in listing for p, label in files]
    key = hashlib.sha256(json.dumps([maker.settings(), layout.classes, stamp]).encode()).hexdigest()[:24]
    cache = _cache_dir() / f"{key}.safetensors"
    if cache.is_file():
        tensors = load_tensors(cache)
        meta = json.loads(tensors.pop("meta").numpy().tobytes().decode())
        sets = {name: ImageSet(tensors[f"{name}.images"], tensors[f"{name}.labels"]) for name in meta["splits"]}
        skipped = meta["skipped"]
    else:
        total = sum(len(files) for _, files in listing)
        done, floats, skipped = 0, {}, []
        for name, files in listing:
            clips, labels, seeds = [], [], []
            for path, label in files:
                try:
                    clips.append(read_wav(path))
                    labels.append(label)
                    seeds.append(int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest()[:8], 16))
                except ValueError as exc:
                    skipped.append(str(exc))
            floats[name] = (maker(clips, seeds=seeds), torch.tensor(labels, dtype=torch.int64))
            done += len(files)
            if progress:
                progress(done, total)
        if sum(len(y) for _, y in floats.values()) == 0:
            example = f", e.g. {skipped[0]}" if skipped else ""
            raise EdgeKDError(f"audiofolder: no readable clips in {str(layout.class_root)!r} ({len(skipped)} "
                              f"unreadable{example}): add PCM WAV files inside the class folders")
        ranges = mfcc_ranges(floats[next(iter(floats))][0]) if cfg.features == "mfcc" else None
        sets = {name: ImageSet(to_uint8(x, cfg.features, ranges), y) for name, (x, y) in floats.items()}
        meta = {"splits": list(sets), "skipped": skipped, "settings": maker.settings(),
                **({"mfcc_ranges": ranges.tolist()} if ranges is not None else {})}
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(cache, {"meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8),
                             **{f"{n}.{k}": getattr(s, k) for n, s in sets.items() for k in ("images", "labels")}})
    if "all" in sets:  # no train/ and test/: the same stratified holdout as every source without a test split
        keep, hold = stratified_holdout(sets["all"].labels, HOLDOUT_FRACTION, HOLDOUT_SEED)
        sets = {"train": sets["all"].subset(keep), "test": sets["all"].subset(hold)}
    noise = "" if cfg.snr_db is None else f", white noise at {cfg.snr_db:g} dB SNR"
    notes = [f"{cfg.features} {maker.size}x{maker.size} at {cfg.sample_rate} Hz, {cfg.clip_seconds:g} s clips{noise} "
             "(edgekd.data.audio)"]
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        log.warning("audiofolder: %s", notes[-1])
    return RawDataset(sets["train"], sets["test"], layout.classes, str(root), notes)
