"""Where bundles are benched: this machine, a device reached over SSH, or a Ray node started with a custom resource.

A `Device` is one entry of a profile's `[devices]` (or `edgekd bench --on`). Over SSH, edgekd drives the system's
OpenSSH client (so ~/.ssh/config, keys, agents and ProxyJump work as they do for the user) and never a library of
its own: it asks the device's edgekd what it is (`edgekd device --json`: one line before any work), copies each
bundle with rsync's content checksums (only what changed; scp of the files whose sha256 differs where a side has no
rsync), runs `edgekd bench --json` there with the study's options and brings the record back into the local bundle,
named by the device. A lost connection (ssh's exit status 255) is tried again, then fails that bench alone.

What identifies a device in a bench's key (`identity`) is what its timings depend on: hostname, CPU, GPU, and the
versions of edgekd and of the backend's runtime. A device that changed reruns its own benches only.

Standard library only (and subprocess): this runs on the study's machine and, as `edgekd device`, on the device.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgekd import __version__
from edgekd.envinfo import cpu_model
from edgekd.errors import EdgeKDError
from edgekd.runio import MANIFEST
from edgekd.runtime.manifest import read_manifest
from edgekd.targets import BACKENDS, TARGETS, missing_for

LOCAL, SSH, RAY = "local", "ssh", "ray"
SSH_LOST = 255  # ssh's own exit status: the connection failed (the remote command's status is passed through)
RSYNC_LOST = {10, 12, 30, 35, 255}  # rsync: socket I/O, protocol stream (the ssh under it died), timeouts


@dataclass(frozen=True)
class Device:
    """Where a bench runs and how it is reached. `name` "" is this machine as today (records without a suffix)."""

    name: str = ""
    reach: str = LOCAL  # local | ssh | ray
    address: str = ""  # ssh: user@host or a Host of the ssh config; ray: the custom resource
    backends: tuple[str, ...] = ("ort",)
    device: str = "cpu"
    ssh_config: str = ""
    edgekd: str = "edgekd"
    workdir: str = ".cache/edgekd/bundles"
    retries: int = 2

    @property
    def title(self) -> str:
        """How a line names it: `orin (ssh me@orin)`, `this machine`."""
        if self.reach == LOCAL:
            return self.name or "this machine"
        return f"{self.name} ({self.reach} {self.address})"


def bench_file_name(backend: str, device: str, device_name: str = "") -> str:
    """A bench record's file name in its bundle (no .json): bench-ort-cpu, bench-ort-cpu@orin."""
    return f"bench-{backend}-{device}" + (f"@{device_name}" if device_name else "")


# -- what a device is ----------------------------------------------------------------------------------------------
@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    """importlib.metadata.packages_distributions(), once per process: it reads every installed distribution's file
    list (~0.3 s here), and a study asked it once per backend at planning."""
    return importlib.metadata.packages_distributions()


@functools.cache
def runtime_version(backend: str) -> str | None:
    """The installed version of a backend's runtime (any distribution that provides its module: onnxruntime or
    onnxruntime-gpu), None where it is not installed; "unknown" where it imports from no pip distribution
    (JetPack's TensorRT comes from apt)."""
    if missing_for(backend):
        return None
    top = BACKENDS[backend].module.split(".")[0]
    for dist in _packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


@functools.lru_cache(maxsize=1)
def device_facts() -> dict:
    """This machine as a bench device: what identifies it, and which backends it can run (with the fix for each
    it cannot). Computed once per process (it runs nvidia-smi)."""
    from edgekd.bench.monitor import gpu_info, jetson_info

    gpu = gpu_info()
    jetson = jetson_info()
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "gpu": (gpu or {}).get("gpu"), "jetson": (jetson or {}).get("l4t"), "python": platform.python_version(),
            "edgekd": __version__, "rsync": shutil.which("rsync") is not None,
            "backends": {name: {"version": runtime_version(name), "missing": missing_for(name)} for name in BACKENDS}}


def node_facts() -> dict:
    """`device_facts` as a plain function: what a Ray task runs on a device's node (a cached function is not one)."""
    return dict(device_facts())


def identity(facts: dict, backend: str) -> dict:
    """The part of a device's facts a bench on `backend` depends on: a bench record is current only on the same."""
    runtime = (facts.get("backends") or {}).get(backend) or {}
    return {"hostname": facts.get("hostname"), "cpu": facts.get("cpu"), "gpu": facts.get("gpu"),
            "edgekd": facts.get("edgekd"), "runtime": f"{BACKENDS[backend].module} {runtime.get('version')}"}


def facts_line(device: Device, facts: dict) -> str:
    """The one line a study prints per device before any work."""
    have = [f"{name} {info['version']}" for name, info in facts["backends"].items() if info["version"]]
    gpu = facts.get("gpu") or "no GPU"
    return (f"{device.title}: {facts['hostname']}, {facts['cpu']} ({facts['cores']} cores), {gpu}, Python "
            f"{facts['python']}, edgekd {facts['edgekd']}; runtimes: {', '.join(have) or 'none'}")


def device_problem(device: Device, facts: dict) -> str | None:
    """What keeps the device from benching what it is asked to, as one line naming the fix; None when nothing."""
    if facts.get("edgekd") != __version__:
        return (f"{device.title} runs edgekd {facts.get('edgekd')}, this machine {__version__}: its bench records "
                f"would not match this study's; install edgekd {__version__} there")
    for backend in device.backends:
        fix = (facts["backends"].get(backend) or {}).get("missing")
        if fix:
            return f"{device.title} cannot run backend {backend}: {fix} (on the device)"
    return None


# -- SSH -----------------------------------------------------------------------------------------------------------
class DeviceLost(EdgeKDError):
    """The connection to a device failed and kept failing: that device's bench fails; nothing else is lost."""


class Ssh:
    """A device reached with the system's ssh, rsync and scp. Every remote command is one ssh invocation with no
    shared connection, so a dead link shows as ssh's exit status 255 on the next call, which is tried again."""

    def __init__(self, device: Device, sleep=time.sleep):
        self.device = device
        self.sleep = sleep

    def edgekd(self, *args: str) -> str:
        """A shell command line that runs the device's edgekd with `args`. The command is the profile's as written
        (`edgekd`, `~/venv/bin/edgekd`, `python3 -m edgekd.cli`: the device's shell expands it); the args quoted."""
        return f"{self.device.edgekd} {shlex.join(args)}"

    def _options(self) -> list[str]:
        # BatchMode: never a password prompt a study cannot answer; ServerAlive: a silent dead link is noticed in
        # about 15 s instead of the kernel's TCP timeout
        config = ["-F", os.path.expanduser(self.device.ssh_config)] if self.device.ssh_config else []
        return [*config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3"]

    def _retrying(self, argv: list[str], what: str, lost: set[int], timeout: float | None) -> subprocess.CompletedProcess:
        tries = self.device.retries + 1
        for attempt in range(tries):
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise EdgeKDError(f"{argv[0]} is not installed on this machine, and {self.device.title} is reached "
                                  f"with it: install the OpenSSH client (apt-get install openssh-client rsync)") from None
            except subprocess.TimeoutExpired:
                done = subprocess.CompletedProcess(argv, SSH_LOST, "", f"no answer in {timeout:.0f} s")
            if done.returncode not in lost:
                return done
            if attempt + 1 < tries:
                self.sleep(2 ** attempt)
        raise DeviceLost(f"{self.device.title}: {what}: the connection failed {tries} time(s) "
                         f"({_first_line(done.stderr) or f'exit status {done.returncode}'}): check that `ssh "
                         f"{self.device.address}` works, then run again; finished benches are kept")

    def run(self, remote: str, what: str, timeout: float | None = None) -> str:
        """A shell command line on the device; its stdout. A failure of the command itself (not of the link) is one
        line."""
        argv = ["ssh", *self._options(), self.device.address, "--", remote]
        done = self._retrying(argv, what, {SSH_LOST}, timeout)
        if done.returncode == 127:
            raise EdgeKDError(f"{self.device.title}: {self.device.edgekd!r} is not found there: pip install "
                              "'edgekd[bench]' on the device (Python 3.10 or newer), or set the device's `edgekd` to "
                              "its full path")
        if done.returncode != 0:
            line = _last_line(done.stderr).removeprefix("edgekd: error:").strip()
            raise EdgeKDError(f"{self.device.title}: {what} failed there: {line or f'exit status {done.returncode}'}")
        return done.stdout

    def facts(self) -> dict:
        out = self.run(self.edgekd("device", "--json"), "asking its edgekd what it is", timeout=120)
        try:
            facts = json.loads(out)
            facts["backends"]  # noqa: B018 - the field every answer of `edgekd device --json` has
        except (ValueError, KeyError, TypeError):
            raise EdgeKDError(f"{self.device.title}: `{self.device.edgekd} device --json` did not answer with "
                              f"edgekd's device facts: install edgekd {__version__} there") from None
        return facts

    def remote_dir(self, bundle: Path) -> str:
        """Where a bundle goes on the device: one directory per local bundle path, under the device's workdir."""
        digest = hashlib.sha256(str(Path(bundle).absolute()).encode()).hexdigest()[:16]
        return f"{self.device.workdir.rstrip('/')}/{digest}"

    def push(self, bundle: Path, files: list[str], with_rsync: bool) -> str:
        """Copy the bundle's `files` to the device (only those whose content differs); returns the remote dir."""
        where = self.remote_dir(bundle)
        if with_rsync:
            ssh = shlex.join(["ssh", *self._options()])
            argv = ["rsync", "-a", "--checksum", "-e", ssh, f"--rsync-path=mkdir -p {shlex.quote(where)} && rsync",
                    *(str(Path(bundle) / f) for f in files), f"{self.device.address}:{where}/"]
            done = self._retrying(argv, "copying the bundle", RSYNC_LOST, None)
            if done.returncode != 0:
                raise EdgeKDError(f"{self.device.title}: rsync failed: {_last_line(done.stderr)}")
            return where
        # No rsync on one side: the device's sha256sum says which files differ; scp copies those
        listing = self.run(f"mkdir -p {shlex.quote(where)} && cd {shlex.quote(where)} && "
                           "{ sha256sum -- * 2>/dev/null || true; }", "listing the bundle's copy")
        there = {name.strip(): digest for digest, _, name in (line.partition(" ") for line in listing.splitlines())}
        from edgekd.runio import sha256_file

        changed = [f for f in files if there.get(f"*{f}", there.get(f)) != sha256_file(Path(bundle) / f)]
        if changed:
            argv = ["scp", "-q", *self._options(), *(str(Path(bundle) / f) for f in changed),
                    f"{self.device.address}:{where}/"]
            done = self._retrying(argv, "copying the bundle", {SSH_LOST, 1}, None)
            if done.returncode != 0:
                raise EdgeKDError(f"{self.device.title}: scp failed: {_last_line(done.stderr)}")
        return where


def _first_line(text: str) -> str:
    """The cause, where a tool prints it first (ssh's "connect to host ...: Connection refused" before rsync's
    own summary)."""
    lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
    return lines[0][:300] if lines else ""


def _last_line(text: str) -> str:
    lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
    return lines[-1][:300] if lines else ""


def bench_files(bundle: Path, options) -> list[str]:
    """The bundle's files a bench on another device needs: the manifest, every model it lists (the bench checks
    them all), the evaluation images, and the PyTorch weights for --backend torch."""
    bundle = Path(bundle)
    files = {MANIFEST, "eval.npz", *(str(m["file"]) for m in read_manifest(bundle)["models"].values())}
    if options.backend == "torch":
        files.add(TARGETS["torch-fp32"].file)
    return sorted(f for f in files if (bundle / f).is_file())


def bench_args(where: str, options) -> list[str]:
    """`edgekd bench` on the device with the study's options, answering with the record as JSON."""
    args = ["bench", where, "--backend", options.backend, "--device", options.device, "--batch-sizes",
            ",".join(map(str, options.batch_sizes)), "--threads", str(options.threads), "--iters", str(options.iters),
            "--warmup", str(options.warmup), "--json"]
    if options.duration:
        args += ["--duration", str(options.duration)]
    for model in options.models:
        args += ["--model", model]
    return args


def bench_over_ssh(device: Device, bundle: Path, options, facts: dict | None = None, ssh: Ssh | None = None) -> dict:
    """Copy the bundle to the device, bench it there, and return the record (its files and key are the device's,
    which hold the same content); `facts`: the device's, from the check before any work (asked again if None)."""
    ssh = ssh or Ssh(device)
    facts = facts or ssh.facts()
    bundle = Path(bundle)
    where = ssh.push(bundle, bench_files(bundle, options), with_rsync=facts.get("rsync") and shutil.which("rsync"))
    out = ssh.run(ssh.edgekd(*bench_args(where, options)), f"benching {bundle}")
    try:
        record = json.loads(out)
    except ValueError:
        raise EdgeKDError(f"{device.title}: `edgekd bench --json` answered something else than a bench record: "
                          f"{_last_line(out)!r}") from None
    return place_record(record, bundle, device, remote_bundle=where)


def place_record(record: dict, bundle: Path, device: Device, **where) -> dict:
    """A bench record as the study's bundle keeps it: its local bundle, and the device it ran on."""
    ran = record.get("on") or {}
    return {**record, "bundle": str(bundle), "on": {"name": device.name, "reach": device.reach,
                                                    "address": device.address, "hostname": ran.get("hostname"), **where}}
