"""A bundle's manifest.json: what every stage after export reads to find the bundle's models and data.

Layering: edgekd.runtime. `edgekd export` writes it (and `edgekd build` adds its engines to it), `edgekd bench`
and `edgekd check` read it; reading refuses a damaged manifest, or one newer than this edgekd reads, with one line.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

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
    for key, entry in manifest["models"].items():  # before anything opens them
        if isinstance(entry, dict) and "file" in entry:
            bundle_file(bundle, entry["file"], f"model {key!r}")
    return manifest


def bundle_file(bundle: Path, name: object, what: str = "a file") -> Path:
    """`bundle / name`, refused in one line unless it stays inside the bundle: a bundle is untrusted input on the
    device, and whoever writes a manifest chooses its names (the sha256 beside them does not help). An absolute
    name, a `..` that climbs out, a link whose target lies outside, or something other than a regular file is
    refused; a name that does not exist yet is returned (opening it says to export again)."""
    bundle = Path(bundle)
    fix = f"{what} of {bundle} must be a file inside the bundle: re-export it (`edgekd export`) rather than edit it"
    if not isinstance(name, str) or not name or "\\" in name:
        raise EdgeKDError(f"{what} is named {name!r}, not a relative path: {fix}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise EdgeKDError(f"{what} is {name!r}, outside the bundle: {fix}")
    path = bundle / pure
    if path.is_symlink() or path.exists():
        real = path.resolve()
        if not real.is_relative_to(bundle.resolve()):
            raise EdgeKDError(f"{what} ({name}) is a link to {real}, outside the bundle: {fix}")
        if not real.is_file():
            raise EdgeKDError(f"{what} ({name}) is not a regular file: {fix}")
    return path


def write_manifest(bundle: Path, manifest: dict) -> Path:
    """Write the whole manifest: export and build do so after each model, so nothing made is lost to a failure."""
    path = Path(bundle) / MANIFEST
    write_json(path, manifest)
    return path
