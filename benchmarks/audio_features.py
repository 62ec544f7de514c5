"""torchaudio against librosa for edgekd's audio features: what each adds to an install, how long it takes to import,
how fast it turns clips into log-mel maps, and whether both give the same map (librosa as the reference for
edgekd.data.audio's torchaudio code).

    python benchmarks/audio_features.py [--clips DIR] [--librosa-path DIR] [--n 500]

--clips: a folder of WAV files (default: the spoken-digits tree, synthesized if missing); --librosa-path: a
directory librosa was installed into (`pip install --target DIR librosa`), so that it stays out of edgekd's own
environment. Each library runs in its own fresh interpreter, one after the other (sizes: the files of its
distribution and of the dependencies only it brings). Prints a table and writes
benchmarks/results/audio_features-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

# what each library brings that edgekd's [train] install does not already have (torch, numpy, scipy, scikit-learn)
OWN_DEPENDENCIES = {
    "torchaudio": ["torchaudio"],
    "librosa": ["librosa", "numba", "llvmlite", "soundfile", "soxr", "audioread", "lazy_loader", "pooch", "msgpack",
                "platformdirs"],
}

CHILD = r"""
import json, sys, time
t = time.perf_counter()
lib = sys.argv[1]
if lib == "torchaudio":
    import torch, torchaudio
else:
    import librosa, numpy
    librosa.feature.melspectrogram  # librosa imports its submodules lazily: count that too
    import librosa.core.spectrum, soxr
import_s = time.perf_counter() - t
from importlib import metadata
from pathlib import Path
size = 0
for name in json.loads(sys.argv[3]):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    size += sum((Path(dist.locate_file(f))).stat().st_size for f in dist.files or [] if Path(dist.locate_file(f)).is_file())
import numpy as np
from edgekd.data.audio import read_wav, fixed_length
clips = [read_wav(Path(p)) for p in json.loads(sys.argv[2])]
rate, samples, n_mels, hop, n_fft = 16000, 16000, 32, 500, 1024
t = time.perf_counter()
maps = []
if lib == "torchaudio":
    from edgekd.config import DatasetConfig
    from edgekd.data.audio import FeatureMaker
    maker = FeatureMaker(DatasetConfig(image_size=32, sample_rate=rate, clip_seconds=1.0))
    maps = maker(clips).numpy()
else:
    for x, r in clips:
        y = librosa.resample(x, orig_sr=r, target_sr=rate, res_type="soxr_hq")
        y = fixed_length(__import__("torch").from_numpy(y), samples).numpy()
        mel = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=2.0,
                                             htk=True, norm=None, center=True, pad_mode="reflect")[:, :32]
        db = librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=80.0)
        maps.append(db)
    maps = np.stack(maps)
features_s = time.perf_counter() - t
if lib == "librosa":  # the same maps from torchaudio's resampled waveform: the features alone, not the resamplers
    import torch, torchaudio
    same = []
    for x, r in clips:
        y = torchaudio.functional.resample(torch.from_numpy(x), r, rate) if r != rate else torch.from_numpy(x)
        y = fixed_length(y, samples).numpy()
        mel = librosa.feature.melspectrogram(y=y, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=2.0,
                                             htk=True, norm=None, center=True, pad_mode="reflect")[:, :32]
        same.append(librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=80.0))
    np.save(sys.argv[4].replace(".npy", "-same-waveform.npy"), np.stack(same))
np.save(sys.argv[4], maps)
print(json.dumps({"import_s": import_s, "install_bytes": size, "features_s": features_s, "clips": len(clips)}))
"""


def run(lib: str, files: list[str], out: Path, path: str | None) -> dict:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", CHILD, lib, json.dumps(files), json.dumps(OWN_DEPENDENCIES[lib]),
                             str(out)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", help="a folder of WAV files (default: the spoken-digits tree)")
    parser.add_argument("--librosa-path", help="where librosa was installed with pip --target (kept out of edgekd's env)")
    parser.add_argument("--n", type=int, default=500, help="clips to featurize")
    args = parser.parse_args()
    import numpy as np

    if args.clips:
        root = Path(args.clips)
    else:
        from edgekd.config import DatasetConfig
        from edgekd.data.sources import SOURCES
        from edgekd.data.spoken_digits import is_made, make_spoken_digits

        root = SOURCES.get("spoken-digits").search_paths(DatasetConfig(source="spoken-digits"))[0]
        if not is_made(root):
            make_spoken_digits(root)
    files = sorted(str(p) for p in root.rglob("*.wav"))[:: max(1, len(list(root.rglob("*.wav"))) // args.n)][: args.n]
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rows, maps = [], {}
    for lib in ("torchaudio", "librosa"):
        out = tmp / f"edgekd-audio-{lib}.npy"
        r = run(lib, files, out, args.librosa_path if lib == "librosa" else None)
        if "error" not in r:
            maps[lib] = np.load(out)
            r["clips_per_s"] = round(r["clips"] / r["features_s"], 1)
            r["install_mb"] = round(r.pop("install_bytes") / 2**20, 1)
            r["import_s"] = round(r["import_s"], 2)
            r["features_s"] = round(r["features_s"], 2)
        rows.append({"library": lib, **r})
    def agree(a, b) -> dict:
        diff = np.abs(a - b)
        loud = (a > -60) & (b > -60)  # bins that carry the word; near the -80 dB floor both are resampler noise
        return {"max_abs_db": round(float(diff.max()), 3), "mean_abs_db": round(float(diff.mean()), 4),
                "p99_abs_db": round(float(np.percentile(diff, 99)), 3),
                "above_-60db_share": round(float(loud.mean()), 3),
                "above_-60db_max_abs_db": round(float(diff[loud].max()), 3),
                "above_-60db_p99_abs_db": round(float(np.percentile(diff[loud], 99)), 3)}

    agreement = None
    if len(maps) == 2:
        agreement = {"each_library_resampling": agree(maps["torchaudio"], maps["librosa"]),
                     "same_waveform": agree(maps["torchaudio"],
                                            np.load(tmp / "edgekd-audio-librosa-same-waveform.npy"))}
    columns = ["library", "install_mb", "import_s", "clips", "features_s", "clips_per_s", "error"]
    show("audio features: torchaudio vs librosa (log-mel 32x32, 16 kHz, 1 s)", columns,
         [[r.get(c, "") for c in columns] for r in rows])
    for name, a in (agreement or {}).items():
        print(f"{name}: |torchaudio - librosa| mean {a['mean_abs_db']} dB, 99th percentile {a['p99_abs_db']} dB, "
              f"at most {a['max_abs_db']} dB; on the {a['above_-60db_share']:.0%} of bins above -60 dB in both: "
              f"99th percentile {a['above_-60db_p99_abs_db']} dB, at most {a['above_-60db_max_abs_db']} dB (one "
              "uint8 level is 0.31 dB)")
    print(save("audio_features", {"clips_dir": str(root), "rows": rows, "agreement": agreement,
                                  "note": "torchaudio batched (edgekd.data.audio); librosa one clip at a time, "
                                          "its API's way; resampling: torchaudio's sinc vs librosa's soxr_hq"}))


if __name__ == "__main__":
    main()
