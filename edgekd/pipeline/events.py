"""What a running study tells its caller: the `Reporter` protocol. The CLI's subclass draws the jobs view and
progress bars; a torchrun worker prints lines; the default hears nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgekd.pipeline.graph import Job


class Reporter:
    def queued(self, jobs: list[Job]) -> None: ...  # the jobs that will run (the others were current)
    def rerun(self, job: Job, reason: str) -> None: ...  # a finished job runs again, and why
    def running(self, job: Job) -> None: ...
    def start(self, job: Job, total_steps: int) -> None: ...
    def advance(self, job: Job, completed: int, loss: float | None, images_per_s: float | None,
                epoch: str = "") -> None: ...
    def finish(self, job: Job, metrics: dict, skipped: bool) -> None: ...
    def failed(self, job: Job, message: str) -> None: ...
    def left_out(self, lines: list[str]) -> None: ...  # records on disk that are not current for this profile
    def note(self, text: str) -> None: ...  # a plan-time fact, before any job runs (each bench device, as it answered)


class StepsOnly(Reporter):
    """Hands a job's step progress to another reporter and nothing else: the driver reports the job's end."""

    def __init__(self, reporter: Reporter | None):
        self.reporter = reporter

    def start(self, job, total_steps):
        if self.reporter:
            self.reporter.start(job, total_steps)

    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if self.reporter:
            self.reporter.advance(job, completed, loss, images_per_s, epoch)
