"""A bundle's manifest.json: what every stage after export reads to find the bundle's models and data.

Layering: edgekd.runtime. `edgekd export` writes it (and `edgekd build` adds its engines to it), `edgekd bench`
and `edgekd check` read it; reading refuses a damaged manifest, or one newer than this edgekd reads, with one line.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.runio import MANIFEST, read_json, write_json


def read_manifest(bundle: Path) -> dict:
    """The bundle's manifest.json; a damaged one, or one newer than this edgekd reads, is a one-line error."""
    from edgekd.records import check_schema

    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise EdgeKDError(f"{bundle} is not a bundle (no manifest.json): pass a directory made by `edgekd export`")
    fix = f"export the run again (edgekd export {Path(bundle).parent})"
    manifest = read_json(path, fix=fix)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise EdgeKDError(f"{path} is not an edgekd bundle manifest (no 'models' table): {fix}")
    check_schema(manifest, path)
    return manifest


def write_manifest(bundle: Path, manifest: dict) -> Path:
    """Write the whole manifest: export and build do so after each model, so nothing made is lost to a failure."""
    path = Path(bundle) / MANIFEST
    write_json(path, manifest)
    return path
