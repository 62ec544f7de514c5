"""Optional experiment tracking: a study's records, also in MLflow (`--mlflow URI` or MLFLOW_TRACKING_URI).

The run directories stay the record; MLflow gets a copy of each finished run when `distill` or `study` is done
(any executor, any machine: it reads files, so no worker needs MLflow or network access): one MLflow run per
edgekd run in the experiment named after the study, with its parameters (job, training settings, losses,
numerics, data), its final metrics, its per-epoch history (`epoch/<name>`, step = epoch), its metrics.json and
profile.json, and its bundle directory (ONNX models, manifest, bench results) once exported. Syncing again
logs only what changed: a retrained run gets a new MLflow run (the old one is tagged `edgekd.superseded_by`),
a re-exported or re-benched bundle is logged again. Standard library only, besides mlflow itself.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgekd.errors import EdgeKDError
from edgekd.runio import MANIFEST, METRICS, RUN_PROFILE, TRAIN_LOG

INSTALL = "pip install 'edgekd[mlflow]'"
ENV = "MLFLOW_TRACKING_URI"
TAG_RUN, TAG_RECORD, TAG_BUNDLE = "edgekd.run_dir", "edgekd.metrics_sha256", "edgekd.bundle_sha256"
TAG_SUPERSEDED = "edgekd.superseded_by"
PARAM_CHARS = 500  # the smallest value limit among MLflow versions and servers
BATCH = 100  # params or metrics per log_batch call (MLflow's limit for params)


def tracking_uri(option: str | None, note: Callable[[str], None] = print) -> str | None:
    """The tracking URI asked for (`--mlflow` first, then MLFLOW_TRACKING_URI), or None. `--mlflow` without
    mlflow installed is an error, raised before anything trains; the variable alone only gets a note."""
    uri = option or os.environ.get(ENV) or None
    if uri is None:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if option:
            raise EdgeKDError(f"--mlflow needs mlflow, which is not installed: {INSTALL}") from None
        note(f"{ENV} is set, but mlflow is not installed, so this study is not tracked: {INSTALL}")
        return None
    return uri


@dataclass
class Synced:
    uri: str
    experiment: str
    logged: int = 0  # runs logged (new or retrained)
    unchanged: int = 0
    bundles: int = 0  # bundles logged (new or changed)

    def line(self) -> str:
        return (f"MLflow {self.uri}, experiment {self.experiment!r}: {self.logged} runs logged, {self.unchanged} "
                f"unchanged, {self.bundles} bundles logged")


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _flat(prefix: str, value, out: dict[str, object]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_params(metrics: dict, setup: dict) -> dict[str, str]:
    """What a run was given: its job, training settings, losses, numerics and data, flattened to strings."""
    params: dict[str, object] = {k: metrics.get(k, "") for k in ("dataset", "variant", "role", "method", "seed",
                                                                  "family", "model")}
    for prefix, value in (("train", setup.get("train")), ("loss", metrics.get("losses")),
                          ("execution", metrics.get("execution")), ("variant", setup.get("variant_config")),
                          ("dataset", setup.get("dataset_config"))):
        _flat(prefix, value or {}, params)
    data = metrics.get("data") or {}
    params.update({f"data.{k}": v for k, v in (data.get("sizes") or {}).items()})
    params.update({"data.classes": len(data.get("classes") or []), "data.image_size": data.get("image_size", ""),
                   "data.channels": data.get("channels", ""), "data.origin": data.get("origin", ""),
                   "teachers": ",".join(metrics.get("teachers") or []),
                   "teacher_cache": metrics.get("teacher_cache", "")})
    return {k: str(v)[:PARAM_CHARS] for k, v in params.items()}


def run_metrics(metrics: dict) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """(final metrics, per-epoch series as (name, value, epoch)) of a run record."""
    final = {k: n for k, v in metrics.items() if (n := _number(v)) is not None and k not in ("seed",)}
    for name, acc in (metrics.get("extra_test_acc") or {}).items():
        final[f"extra_test_acc/{name}"] = float(acc)
    series = [(f"epoch/{k}", n, int(record["epoch"])) for record in metrics.get("history") or []
              for k, v in record.items() if k != "epoch" and (n := _number(v)) is not None]
    return final, series


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    scheme = urlparse(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a path (C: included): MLflow's file store
        # MLflow 3.x refuses file stores unless this is set; a file URI given on purpose is that consent.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name)


def _tracked(client, experiment_id: str) -> dict[str, object]:
    """The current (not superseded) MLflow run of every edgekd run directory in the experiment."""
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if TAG_RUN in tags and TAG_SUPERSEDED not in tags:
                runs[tags[TAG_RUN]] = run
        token = page.token
        if not token:
            return runs


def _log_batch(client, run_id: str, params: dict[str, str], final: dict[str, float],
               series: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    p = [Param(k, v) for k, v in params.items()]
    m = [Metric(k, v, now, 0) for k, v in final.items()] + [Metric(k, v, now, step) for k, v, step in series]
    for i in range(0, max(len(p), len(m)), BATCH):
        client.log_batch(run_id, metrics=m[i : i + BATCH], params=p[i : i + BATCH])


def sync_study(study_root: Path, uri: str, log: Callable[[str], None] = print) -> Synced:
    """Log every finished training run of a study (and its bundle, where exported) to MLflow at `uri`."""
    from edgekd.records import read_run_setup, read_runs
    from edgekd.runio import read_json

    study_root = Path(study_root)
    client = _client(uri)
    experiment_id = _experiment(client, study_root.name)
    tracked = _tracked(client, experiment_id)
    done = Synced(uri, study_root.name)
    for record in read_runs(study_root):
        if record.role == "teacher_cache":
            continue
        where = study_root / record.run_dir
        metrics = read_json(where / METRICS)
        digest = _digest([where / METRICS])
        run = tracked.get(record.run_dir)
        if run is not None and run.data.tags.get(TAG_RECORD) == digest:
            run_id = run.info.run_id
            done.unchanged += 1
        else:
            setup = read_run_setup(where)
            profile = read_json(where / RUN_PROFILE).get("profile", {}) if (where / RUN_PROFILE).is_file() else {}
            setup["dataset_config"] = (profile.get("datasets") or {}).get(record.dataset)
            label = f"{record.dataset}/{record.variant}/{Path(record.run_dir).parent.name}/seed{record.seed}"
            run_id = client.create_run(experiment_id, run_name=label, tags={
                TAG_RUN: record.run_dir, TAG_RECORD: digest, "edgekd.study_root": str(study_root.resolve()),
                "edgekd.role": record.role}).info.run_id
            _log_batch(client, run_id, run_params(metrics, setup), *run_metrics(metrics))
            for name in (METRICS, RUN_PROFILE, TRAIN_LOG):
                if (where / name).is_file():
                    client.log_artifact(run_id, str(where / name), "record")
            client.set_terminated(run_id, "FINISHED")
            if run is not None:
                client.set_tag(run.info.run_id, TAG_SUPERSEDED, run_id)
                run = None
            done.logged += 1
        bundle = where / "bundle"
        if (bundle / MANIFEST).is_file():
            files = sorted(p for p in bundle.iterdir() if p.is_file() and p.suffix == ".json")
            bundle_digest = _digest(files)
            if run is None or run.data.tags.get(TAG_BUNDLE) != bundle_digest:
                client.log_artifacts(run_id, str(bundle), "bundle")
                client.set_tag(run_id, TAG_BUNDLE, bundle_digest)
                done.bundles += 1
    log(done.line())
    return done
