"""The bench stage's job kind, `bench`: one bundle benched on one backend of one device (`edgekd bench` inside a
study). The study's benches fan out over the profile's devices x their backends (edgekd.bench.devices): this
machine, alone while it times latency; a Ray node with the device's custom resource, which Ray places the job on;
or a device over SSH, one bench at a time per device. Its record is `bundle/bench-<backend>-<device>[@<name>].json`.

Each device is asked what it is once, before any job runs (`prepare`): one line per device, and its identity goes
into each of its benches' keys, so a changed device reruns its own benches only. A device that does not answer
then fails its benches alone, each with the line that says why; a rerun finishes them.
"""

from __future__ import annotations

from dataclasses import replace

from edgekd.bench.devices import LOCAL, RAY, SSH, Device, bench_file_name
from edgekd.errors import EdgeKDError
from edgekd.pipeline.graph import JobKind, NotReady, register_kind
from edgekd.runio import BUNDLE, MANIFEST


def bench_devices(profile) -> list[Device]:
    """The profile's [devices], or this machine with deploy.backend and deploy.device when it names none."""
    d = profile.deploy
    if not profile.devices:
        return [Device("", LOCAL, "", (d.backend,), d.device)]
    return [Device(name, SSH if c.ssh else RAY if c.ray else LOCAL, c.ssh or c.ray, tuple(c.backends or [d.backend]),
                   c.device or d.device, c.ssh_config, c.edgekd, c.workdir, c.retries)
            for name, c in profile.devices.items()]


def bench_options(profile, backend: str | None = None, device: str | None = None):
    from edgekd.bench.harness import BenchOptions

    d = profile.deploy
    return BenchOptions(backend or d.backend, device or d.device, tuple(d.batch_sizes), d.threads, d.iters)


class DeviceUnavailable(NotReady):
    """The device did not answer (or cannot run the backend) when the study checked it: its benches wait for a
    rerun that finds it."""

    fix = "run again once the device answers; the other jobs are not affected"


class NeedsRay(EdgeKDError):
    """A device reached through Ray, in a study on another executor: a profile error, refused before any work."""


class BenchKind(JobKind):
    name = "bench"
    deploy = True

    def plan(self, ctx, planned):
        jobs = []
        for b in (b for b in planned if b.kind == "bundle"):
            for device in bench_devices(ctx.profile):
                for backend in device.backends:
                    # Over SSH this machine only copies and waits: the device is the one timing (and one bench at a
                    # time runs there, by its lock); here and on a Ray node the bench has the machine to itself
                    remote = device.reach == SSH
                    jobs.append(replace(
                        b, kind=self.name, output=bench_file_name(backend, device.device, device.name),
                        deps=(b.label,), num_cpus=0.0 if remote else 1.0,
                        num_gpus=1.0 if device.device == "cuda" and not remote else 0.0, exclusive=not remote,
                        resources={device.address: 1.0} if device.reach == RAY else {},
                        params={"device": device.name, "reach": device.reach, "backend": backend}))
        return jobs

    def prepare(self, ctx, jobs, measured):
        """Ask each device what it is, once, before any work: one line each; its identity into its benches."""
        from edgekd.bench.devices import device_facts, device_problem, facts_line, identity

        names = list(dict.fromkeys(j.params["device"] for j in jobs if j.kind == self.name))
        devices = {d.name: d for d in bench_devices(ctx.profile)}
        answers = {}
        for name in names:
            device = devices[name]
            facts, problem = None, None
            try:
                facts = self._ask(ctx, device) if device.reach != LOCAL else device_facts()
                problem = device_problem(device, facts)
            except NeedsRay:
                raise
            except EdgeKDError as exc:  # it did not answer, or not as edgekd does: its benches fail with this
                problem = str(exc)
            answers[name] = facts, problem
            if ctx.reporter and device.name:
                ctx.reporter.note(f"device {problem}: its benches fail until it answers" if problem
                                  else facts_line(device, facts))
        out = []
        for job in jobs:
            if job.kind == self.name:
                facts, problem = answers[job.params["device"]]
                extra = ({"problem": problem} if problem else
                         {"identity": identity(facts, job.params["backend"]), "rsync": bool(facts.get("rsync"))})
                job = replace(job, params={**job.params, **extra})
            out.append(job)
        return out

    @staticmethod
    def _ask(ctx, device: Device) -> dict:
        from edgekd.bench.devices import Ssh, node_facts

        if device.reach == SSH:
            return Ssh(device).facts()
        if getattr(ctx, "executor", "local") != "ray":
            raise NeedsRay(f"device {device.name} is a Ray node (ray = {device.address!r}): run the study with "
                              "--executor ray --address <its cluster>")
        return ctx.measure(node_facts, resources={device.address: 1.0})

    def record(self, job):
        return job.run_dir / BUNDLE / f"{job.output}.json"

    def key(self, ctx, job):
        from edgekd.bench.harness import bench_key

        bundle = job.run_dir / BUNDLE
        if not (bundle / MANIFEST).is_file():
            raise NotReady(f"bundle {bundle} is not exported yet")
        if job.params.get("problem"):
            raise DeviceUnavailable(job.params["problem"])
        return bench_key(bundle, self._options(ctx, job), job.params.get("identity"))

    def _options(self, ctx, job):
        device = self._device(ctx, job)
        return bench_options(ctx.profile, job.params.get("backend"), device.device)

    @staticmethod
    def _device(ctx, job) -> Device:
        name = job.params.get("device", "")
        return next(d for d in bench_devices(ctx.profile) if d.name == name)

    def run(self, ctx, job, status):
        from edgekd.bench.devices import bench_over_ssh, place_record
        from edgekd.bench.harness import bench_bundle, save_bench
        from edgekd.pipeline.driver import file_lock

        device, bundle = self._device(ctx, job), job.run_dir / BUNDLE
        options = self._options(ctx, job)
        if device.reach == SSH:
            with file_lock(ctx.root / ".locks" / f"device-{device.name}.lock"):  # one bench at a time on it
                record = bench_over_ssh(device, bundle, options, {"rsync": job.params.get("rsync")})
        else:
            record = bench_bundle(bundle, options)
            if device.name:
                where = {}
                if device.reach == RAY:  # the node Ray placed it on: the one with the device's resource
                    import ray

                    where["node_id"] = ray.get_runtime_context().get_node_id()
                record = place_record(record, bundle, device, **where)
        save_bench(record, job.record)
        return record

    def brief(self, record):
        """A bench's results shrink to each model's accuracy and median latencies (what the CLI's line shows)."""
        return super().brief(record) | {"results": [
            {"model": r["model"], "accuracy": r.get("accuracy"),
             "latency": {b: {"p50_ms": s["p50_ms"]} for b, s in r["latency"].items()}}
            for r in record.get("results", [])]}


register_kind(BenchKind())
