"""Spoken digits ("zero" ... "nine", classes 0-zero ... 9-nine) synthesized here by Debian's espeak-ng: a small keyword-spotting set in the
manner of MLPerf Tiny's KWS task, that no one here recorded or wrote by hand. Every clip is one word said by one
(accent, speaker, speed, pitch) of a fixed grid; the test split's speakers never speak in training, so a model is
judged on voices it has not heard (a random split would put the same voice in both).

Written once as a class-per-folder tree (train/<word>/*.wav, test/<word>/*.wav) with `spoken-digits.json` saying
what made it (espeak-ng's version, the grid); read like any audio folder (edgekd.data.audio). A tree whose record
differs from this grid is made again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

from edgekd.errors import EdgeKDError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSES = tuple(f"{i}-{word}" for i, word in enumerate(WORDS))  # the folder names: sorted, they are in digit order
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
SPEAKERS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")  # espeak-ng's voice variants (+m1, +f1, ...)
TEST_SPEAKERS = ("m4", "f4")  # held out: one male and one female variant, in every accent
SPEEDS = (130, 170)  # words per minute (espeak-ng's default is 175)
PITCHES = (35, 65)  # 0-99 (default 50)
RECORD = "spoken-digits.json"


def grid() -> dict:
    return {"words": list(WORDS), "classes": list(CLASSES), "accents": list(ACCENTS), "speakers": list(SPEAKERS),
            "test_speakers": list(TEST_SPEAKERS), "speeds": list(SPEEDS), "pitches": list(PITCHES)}


def clips_per_word() -> tuple[int, int]:
    """(train, test) clips of each word."""
    per_speaker = len(ACCENTS) * len(SPEEDS) * len(PITCHES)
    return per_speaker * (len(SPEAKERS) - len(TEST_SPEAKERS)), per_speaker * len(TEST_SPEAKERS)


def espeak() -> tuple[str, str]:
    """espeak-ng's path and version line; one clear error where it is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EdgeKDError("spoken-digits: espeak-ng is not installed: `apt-get install espeak-ng`, or point data_dir "
                          "at a tree it made on another machine")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return exe, version


def is_made(root: Path) -> bool:
    record = root / RECORD
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("grid") == grid()
    except (OSError, ValueError):
        return False


def make_spoken_digits(root: Path, progress=None, workers: int = 4) -> Path:
    """Synthesize the grid into `root` (made in a temporary sibling, then moved: a cut-short run leaves nothing
    that looks finished). `progress(done, total)` is called as clips are written."""
    exe, version = espeak()
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    jobs = []
    for (word, folder), accent, speaker, speed, pitch in product(zip(WORDS, CLASSES, strict=True), ACCENTS, SPEAKERS,
                                                                  SPEEDS, PITCHES):
        split = "test" if speaker in TEST_SPEAKERS else "train"
        jobs.append((word, f"{accent}+{speaker}", speed, pitch,
                     f"{split}/{folder}/{accent}+{speaker}-s{speed}-p{pitch}.wav"))
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as tmp:
        for split, folder in product(("train", "test"), CLASSES):
            (Path(tmp) / split / folder).mkdir(parents=True)

        def say(job) -> None:
            word, voice, speed, pitch, rel = job
            out = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(Path(tmp) / rel),
                                  word], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise EdgeKDError(f"spoken-digits: espeak-ng failed on {voice!r} saying {word!r}: "
                                  f"{(out.stderr or out.stdout).strip()[:200]}")

        with ThreadPoolExecutor(workers) as pool:
            for done, _ in enumerate(pool.map(say, jobs), 1):
                if progress and (done % 200 == 0 or done == len(jobs)):
                    progress(done, len(jobs))
        (Path(tmp) / RECORD).write_text(json.dumps({"made_by": version, "grid": grid()}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        Path(tmp).rename(root)
        Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return root
