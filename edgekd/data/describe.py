"""What a job's record says about its data: the dataset's settings (not where its files live), the variant's, and
the source's split sizes, counted without loading the images. Every stage's key includes it, so a changed dataset
or variant makes its runs, bundles and maps stale."""

from __future__ import annotations

import json
from dataclasses import asdict

from edgekd.errors import EdgeKDError

_SIZES: dict[str, dict | None] = {}


def source_sizes(cfg) -> dict | None:
    """Images and classes of a data source's splits, counted without loading them (None: not knowable yet)."""
    from edgekd.data.sources import SOURCES

    memo = json.dumps(asdict(cfg), sort_keys=True)
    if memo not in _SIZES:
        try:
            sizes = SOURCES.get(cfg.source).sizes(cfg)
        except EdgeKDError:
            sizes = None
        _SIZES[memo] = None if sizes is None else {"classes": len(sizes.classes), "train": int(sizes.train.sum()),
                                                   "test": int(sizes.test.sum())}
    return _SIZES[memo]


def settings_in_key(settings: dict) -> dict:
    """Of a dataset's settings (a DatasetConfig as a dict), those its results depend on: not where its files live
    (moving the files changes no result), and a source's own settings (config.SOURCE_SETTINGS) only for it."""
    from edgekd.config import SOURCE_SETTINGS

    own = set(SOURCE_SETTINGS.get(settings.get("source"), ()))
    skip = {"data_dir", "download", *(k for keys in SOURCE_SETTINGS.values() for k in keys if k not in own)}
    return {k: v for k, v in settings.items() if k not in skip}


# How the normalization constants are computed (edgekd/data/splits.py channel_stats); a change moves every
# training's numbers (2: numpy float64, independent of the thread count that loads the data)
NORMALIZATION_REVISION = 2


def data_settings(profile, dataset: str) -> dict:
    """A dataset's settings that its results depend on (settings_in_key)."""
    return settings_in_key(asdict(profile.datasets[dataset]))


def data_description(profile, dataset: str, variant: str) -> dict:
    """The data a job trains on: the dataset's settings, the variant's, and the source's split sizes."""
    from edgekd.config import VariantConfig
    from edgekd.data.variants import REVISIONS

    config = profile.variants.get(variant, VariantConfig())
    described = {f"datasets.{dataset}": data_settings(profile, dataset), f"variants.{variant}": asdict(config),
                 "sizes": source_sizes(profile.datasets[dataset]), "normalization": NORMALIZATION_REVISION}
    if config.kind in REVISIONS:  # runs made by an earlier version of the kind's transformation are stale
        described["variant_revision"] = REVISIONS[config.kind]
    return described
