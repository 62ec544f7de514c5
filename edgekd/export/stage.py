"""The export stage's job kind, `bundle`: one student's deployable bundle (`edgekd export` inside a study), with
the key, the output check and the deploy options the profile gives. Planned for every student run of the graph
but a tuned method's grid candidates (tuning runs stay runs)."""

from __future__ import annotations

from dataclasses import replace

from edgekd.pipeline.graph import JobKind, NotReady, register_kind
from edgekd.roles import Role
from edgekd.runio import BUNDLE, MANIFEST, METRICS, read_json
from edgekd.targets import exported_target, int8_target

BUNDLE_LOG = "export.log"
INT8_TRAINER = "int8_trainer"  # the service (options -> trainer or None) a qat-kd export needs; see Context.services


def export_options(profile):
    from edgekd.export.bundle import ExportOptions

    d = profile.deploy
    return ExportOptions(targets=tuple(d.targets), calib_size=d.calib_size, calib_method=d.calib_method,
                         int8_presets=tuple(d.int8_presets), eval_limit=d.eval_limit, int8_method=d.int8_method,
                         int8_max_drop=d.int8_max_drop, int8_escalation=tuple(d.int8_escalation),
                         qat_epochs=d.qat_epochs, qat_lr=d.qat_lr, int8_compare=tuple(d.int8_compare),
                         onnx_exporter=d.onnx_exporter)


def wanted_models(profile) -> set[str]:
    """The models a study's bundle must hold: the FP32 ONNX model, an INT8 model per preset, and with `pte` the
    ExecuTorch programs (FP32, and INT8 with `int8`)."""
    d = profile.deploy
    int8 = {int8_target(p).key for p in d.int8_presets} if "int8" in d.targets else set()
    pte = {"pte-fp32", *(["pte-int8"] if "int8" in d.targets else [])} if "pte" in d.targets else set()
    return {exported_target("fp32").key} | int8 | pte


class BundleKind(JobKind):
    name = "bundle"
    deploy = True

    def plan(self, ctx, planned):
        return [replace(s, kind=self.name, output=BUNDLE, deps=(s.label,), num_cpus=1.0, num_gpus=0.0, params={})
                for s in planned if s.kind == "train" and not Role.parse(s.role).is_teacher
                and not Role.parse(s.role).grid]

    def record(self, job):
        return job.run_dir / BUNDLE / MANIFEST

    def key(self, ctx, job):
        from edgekd.export.bundle import export_key

        if not (job.run_dir / METRICS).is_file():
            raise NotReady(f"student {job.run_dir} is not trained yet")
        return export_key(job.run_dir, export_options(ctx.profile))

    def damage(self, ctx, job, record):
        missing = sorted(wanted_models(ctx.profile) - set(record.get("models", {})))
        if missing:
            return f"it has no {', '.join(missing)} yet"
        for entry in record["models"].values():
            if not (job.run_dir / BUNDLE / entry["file"]).is_file():
                return f"{entry['file']} is missing"
        return None

    def run(self, ctx, job, status):
        from edgekd.export.bundle import export_run

        trainer = ctx.services.get(INT8_TRAINER)  # qat-kd trains: distill's, handed over by the composition root
        with open(job.run_dir / BUNDLE_LOG, "a") as log:
            options = export_options(ctx.profile)
            bundle = export_run(job.run_dir, options, log=lambda line: log.write(line + "\n"),
                                qat=trainer(options) if trainer else None)
        return read_json(bundle / MANIFEST)


register_kind(BundleKind())
