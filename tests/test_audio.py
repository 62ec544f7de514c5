"""Audio sources: WAV reading, log-mel / MFCC maps, the feature cache, espeak-ng's spoken digits, and a study on
audio end to end (train, export with INT8, the torch-free bench's input is the spectrogram)."""

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_profile_with

from edgekd.config import DatasetConfig
from edgekd.errors import EdgeKDError


def write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if width == 1:
        data = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 2:
        data = np.round(x * 32767).astype("<i2").tobytes()
    else:  # 24-bit: the high three bytes of a 32-bit sample
        data = b"".join(int(v).to_bytes(4, "little", signed=True)[1:] for v in np.round(x * (2**31 - 256)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def tone(freq: float, rate: int, seconds: float = 0.5, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_FEATURE_CACHE", str(tmp_path / "feature-cache"))
    return tmp_path / "feature-cache"


@pytest.mark.parametrize("width", [1, 2, 3])
def test_read_wav_widths(tmp_path, width):
    from edgekd.data.audio import read_wav

    x = tone(440, 8000, 0.1)
    write_wav(tmp_path / "a.wav", x, 8000, width)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and len(y) == len(x)
    assert np.abs(y - x).max() < (0.02 if width == 1 else 1e-3)


def test_an_unreadable_wav_is_a_value_error(tmp_path):
    from edgekd.data.audio import read_wav

    (tmp_path / "bad.wav").write_bytes(b"RIFF....not audio")
    with pytest.raises(ValueError, match="not a readable PCM WAV"):
        read_wav(tmp_path / "bad.wav")


def test_logmel_puts_a_tone_in_its_mel_band_and_batches_equal_single_clips():
    import torchaudio

    from edgekd.data.audio import FeatureMaker

    cfg = DatasetConfig(image_size=32, sample_rate=16000, clip_seconds=1.0)
    maker = FeatureMaker(cfg)
    clips = [(tone(f, 22050), 22050) for f in (300, 1000, 3000)] + [(tone(1000, 16000, 0.3), 16000)]
    batch = maker(clips)
    assert batch.shape == (4, 32, 32)
    one_by_one = torch.cat([maker([c]) for c in clips])
    assert torch.allclose(batch, one_by_one, atol=1e-3)
    # the band holding each tone: torchaudio's mel filterbank centres (HTK scale), as the transform uses
    fb = torchaudio.functional.melscale_fbanks(maker.mel.n_fft // 2 + 1, 0.0, 8000.0, 32, 16000)
    freqs = torch.linspace(0, 8000, maker.mel.n_fft // 2 + 1)
    for (_, rate), f, clip in zip(clips, (300, 1000, 3000, 1000), batch, strict=True):
        expected = int(fb[(freqs - f).abs().argmin()].argmax())
        middle = clip[:, 14:18].mean(dim=1)  # frames inside the tone (clips are centred)
        assert abs(int(middle.argmax()) - expected) <= 1, (f, rate)
    assert float(batch.max()) == 0.0 and float(batch.min()) >= -80.0  # dB relative to the loudest bin


def write_tone_folder(root: Path, rates=(16000, 22050)) -> None:
    """Three classes of tones (low, middle, high), train/ and test/, at mixed sample rates."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, base in enumerate((250, 900, 2800)):
            for i in range(n):
                f = base * (1 + 0.1 * rng.standard_normal())
                write_wav(root / split / f"c{label}" / f"{i}.wav", tone(f, rates[i % len(rates)], 0.4), rates[i % len(rates)])


@pytest.mark.parametrize("features", ["logmel", "mfcc"])
def test_audiofolder_loads_caches_and_recomputes_when_a_clip_changes(tmp_path, feature_cache, features):
    from edgekd.data.sources import SOURCES

    write_tone_folder(tmp_path / "tones")
    (tmp_path / "tones" / "train" / "c0" / "broken.wav").write_bytes(b"nope")
    cfg = DatasetConfig(source="audiofolder", data_dir=str(tmp_path / "tones"), image_size=16, features=features)
    source = SOURCES.get("audiofolder")
    sizes = source.sizes(cfg)
    assert sizes.classes == ["c0", "c1", "c2"] and sizes.train.tolist() == [13, 12, 12]  # listing: broken counted
    raw = source.load(cfg)
    assert raw.train.images.shape == (36, 1, 16, 16) and raw.train.images.dtype == torch.uint8
    assert raw.test.images.shape == (12, 1, 16, 16)
    assert any("skipped 1 unreadable" in n for n in raw.notes)
    assert len(list(feature_cache.glob("*.safetensors"))) == 1
    again = source.load(cfg)  # from the cache: the same tensors
    assert torch.equal(again.train.images, raw.train.images) and torch.equal(again.test.labels, raw.test.labels)
    assert len(list(feature_cache.glob("*.safetensors"))) == 1
    write_wav(tmp_path / "tones" / "train" / "c1" / "0.wav", tone(5000, 16000, 0.4), 16000)  # a changed clip
    changed = source.load(cfg)
    assert len(list(feature_cache.glob("*.safetensors"))) == 2
    assert not torch.equal(changed.train.images, raw.train.images)
    # the classes are told apart by their maps: the mean map of each class differs from the others'
    means = torch.stack([raw.train.images[raw.train.labels == c].float().mean(0) for c in range(3)])
    assert (means[0] - means[1]).abs().mean() > 5 and (means[1] - means[2]).abs().mean() > 5


def test_audiofolder_without_clips_is_one_clear_line(tmp_path):
    from edgekd.data.sources import SOURCES

    (tmp_path / "empty" / "c0").mkdir(parents=True)
    cfg = DatasetConfig(source="audiofolder", data_dir=str(tmp_path / "empty"))
    with pytest.raises(EdgeKDError, match=r"audiofolder: no \.wav files"):
        SOURCES.get("audiofolder").sizes(cfg)
    with pytest.raises(EdgeKDError, match="audiofolder: directory .* does not exist"):
        SOURCES.get("audiofolder").load(DatasetConfig(source="audiofolder", data_dir=str(tmp_path / "none")))


def test_unknown_audio_features_are_a_profile_error(tmp_path):
    from edgekd.config import load_profile

    path = tmp_path / "p.toml"
    path.write_text("[datasets.a]\nsource = 'audiofolder'\nfeatures = 'chroma'\n")
    with pytest.raises(EdgeKDError, match=r"datasets\.a\.features' must be 'logmel' or 'mfcc'"):
        load_profile(path)


def test_audio_settings_enter_keys_only_for_audio_sources():
    from edgekd.data.describe import settings_in_key

    image = settings_in_key({"source": "digits", "features": "mfcc", "sample_rate": 8000, "data_dir": "x"})
    audio = settings_in_key({"source": "spoken-digits", "features": "mfcc", "sample_rate": 8000, "data_dir": "x"})
    assert image == {"source": "digits"}  # the keys of image studies made before audio existed are unchanged
    assert audio == {"source": "spoken-digits", "features": "mfcc", "sample_rate": 8000}


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="Debian's espeak-ng is not installed (.ci/run installs it)")


@pytest.fixture
def small_grid(monkeypatch):
    """spoken-digits with one accent, three speakers (one held out), one speed and pitch: 30 clips."""
    from edgekd.data import spoken_digits

    monkeypatch.setattr(spoken_digits, "ACCENTS", ("en-us",))
    monkeypatch.setattr(spoken_digits, "SPEAKERS", ("m1", "m3", "f1"))
    monkeypatch.setattr(spoken_digits, "TEST_SPEAKERS", ("f1",))
    monkeypatch.setattr(spoken_digits, "SPEEDS", (150,))
    monkeypatch.setattr(spoken_digits, "PITCHES", (50,))


@needs_espeak
def test_spoken_digits_are_synthesized_once_with_held_out_speakers(tmp_path, small_grid):
    from edgekd.data import spoken_digits
    from edgekd.data.sources import SOURCES

    cfg = DatasetConfig(source="spoken-digits", data_dir=str(tmp_path / "sd"))
    source = SOURCES.get("spoken-digits")
    assert source.sizes(cfg).train.tolist() == [2] * 10 and source.sizes(cfg).test.tolist() == [1] * 10
    raw = source.load(cfg)
    assert raw.classes == list(spoken_digits.CLASSES) and raw.classes[7] == "7-seven"
    assert raw.train.images.shape == (20, 1, 32, 32) and raw.test.images.shape == (10, 1, 32, 32)
    test_files = sorted(p.name for p in (tmp_path / "sd" / "test").rglob("*.wav"))
    assert test_files and all("+f1-" in name for name in test_files)  # the held-out speaker only
    assert not any("+f1-" in p.name for p in (tmp_path / "sd" / "train").rglob("*.wav"))
    stamp = (tmp_path / "sd" / spoken_digits.RECORD).stat().st_mtime_ns
    source.load(cfg)  # made already: not synthesized again
    assert (tmp_path / "sd" / spoken_digits.RECORD).stat().st_mtime_ns == stamp


def test_spoken_digits_without_espeak_is_one_clear_line(tmp_path, monkeypatch):
    from edgekd.data.sources import SOURCES

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = DatasetConfig(source="spoken-digits", data_dir=str(tmp_path / "sd"))
    with pytest.raises(EdgeKDError, match="espeak-ng is not installed: `apt-get install espeak-ng`"):
        SOURCES.get("spoken-digits").sizes(cfg)


AUDIO_DATASET = """
[datasets.tones]
source = "audiofolder"
data_dir = "ROOT"
image_size = 16
features = "logmel"
hflip = false
crop_padding = 1
"""
DEPLOY = """
[deploy]
targets = ["onnx", "int8"]
int8_max_drop = 100.0
batch_sizes = [1, 4]
iters = 3
"""


def test_a_study_on_audio_runs_end_to_end(tmp_path):
    """Distill, export (ONNX parity, INT8) and bench on spectrograms: nothing downstream knows it is audio."""
    import json

    from edgekd.config import load_profile
    from edgekd.workflows import study

    write_tone_folder(tmp_path / "tones")
    profile = tiny_profile_with(AUDIO_DATASET.replace("ROOT", str(tmp_path / "tones")), DEPLOY, name="tones")
    (tmp_path / "tones.toml").write_text(profile.replace("seeds = [0, 1]", "seeds = [0]"))
    study(load_profile(tmp_path / "tones.toml"), tmp_path / "runs")
    bundle = tmp_path / "runs" / "tones" / "tones" / "base" / "kd" / "seed0" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input_shape"] == [1, 16, 16] and manifest["classes"] == ["c0", "c1", "c2"]
    assert manifest["models"]["onnx-fp32"]["parity"]["ok"]
    assert "onnx-int8-cpu" in manifest["models"]
    assert list(bundle.glob("bench-*.json"))


def test_background_noise_has_the_asked_snr_and_is_the_same_every_time(tmp_path, monkeypatch):
    from edgekd.data.audio import FeatureMaker, fixed_length, load_audio_folder

    maker = FeatureMaker(DatasetConfig(snr_db=10.0))
    x = torch.from_numpy(tone(440, 16000, 0.5).astype(np.float32))
    clip = fixed_length(x, 16000)
    noisy = maker.noisy(clip, len(x), seed=7)
    noise_power = float(((noisy - clip) ** 2).mean())
    assert abs(10 * np.log10(float((x**2).mean()) / noise_power) - 10.0) < 0.2
    assert torch.equal(noisy, maker.noisy(clip, len(x), seed=7)) and not torch.equal(noisy, maker.noisy(clip, len(x), 8))

    write_tone_folder(tmp_path / "tones")
    clean = load_audio_folder(tmp_path / "tones", DatasetConfig(image_size=16))
    cfg = DatasetConfig(image_size=16, snr_db=0.0)
    first = load_audio_folder(tmp_path / "tones", cfg)
    monkeypatch.setenv("EDGEKD_FEATURE_CACHE", str(tmp_path / "another-cache"))  # computed again, not read back
    again = load_audio_folder(tmp_path / "tones", cfg)
    assert torch.equal(first.train.images, again.train.images)
    assert not torch.equal(first.train.images, clean.train.images)
    assert torch.equal(first.train.labels, clean.train.labels)
    assert any("white noise at 0 dB SNR" in note for note in first.notes)
