"""The bench stage's job kind, `bench`: one bundle benched on the profile's backend and device (`edgekd bench`
inside a study), alone on its machine while it times latency. Its record is `bundle/bench-<backend>-<device>.json`."""

from __future__ import annotations

from dataclasses import replace

from edgekd.pipeline.graph import JobKind, NotReady, register_kind
from edgekd.runio import BUNDLE, MANIFEST


def bench_options(profile):
    from edgekd.bench.harness import BenchOptions

    d = profile.deploy
    return BenchOptions(d.backend, d.device, tuple(d.batch_sizes), d.threads, d.iters)


class BenchKind(JobKind):
    name = "bench"
    deploy = True

    def plan(self, ctx, planned):
        d = ctx.profile.deploy
        return [replace(b, kind=self.name, output=f"bench-{d.backend}-{d.device}", deps=(b.label,),
                        num_gpus=1.0 if d.device == "cuda" else 0.0, exclusive=True)
                for b in planned if b.kind == "bundle"]

    def record(self, job):
        return job.run_dir / BUNDLE / f"{job.output}.json"

    def key(self, ctx, job):
        from edgekd.bench.harness import bench_key

        bundle = job.run_dir / BUNDLE
        if not (bundle / MANIFEST).is_file():
            raise NotReady(f"bundle {bundle} is not exported yet")
        return bench_key(bundle, bench_options(ctx.profile))

    def run(self, ctx, job, status):
        from edgekd.bench.harness import bench_bundle, save_bench

        record = bench_bundle(job.run_dir / BUNDLE, bench_options(ctx.profile))
        save_bench(record, job.record)
        return record

    def brief(self, record):
        """A bench's results shrink to each model's accuracy and median latencies (what the CLI's line shows)."""
        return super().brief(record) | {"results": [
            {"model": r["model"], "accuracy": r.get("accuracy"),
             "latency": {b: {"p50_ms": s["p50_ms"]} for b, s in r["latency"].items()}}
            for r in record.get("results", [])]}


register_kind(BenchKind())
