"""The role grammar, parsed in one place: what a run directory's `<role>` segment says and how a job's label maps
to its run directory.

A role is `<base>[@<family>]`. The base is `teacher`, `teacher_cache`, `scratch`, `explain` or a KD method, and a
method may carry one tag: `kd~2` (the third candidate of kd's hyper-parameter grid) or `kd+prune50` (the kd
student with half its channels pruned, then fine-tuned). After `@` comes a teacher's name (`teacher@big`) or a
student family (`kd@resnet`). A job's label is `<dataset>/<variant>/<role>/seed<k>[/<output>]`, which is also its
run directory under the study root (edgekd.runio.run_dir), so every name in it must be one path segment: the plan
check refuses the others (`segment_problem`).

Standard library only, below every stage: data, distill, export, bench and report all read roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TEACHER, SCRATCH, CACHE, EXPLAIN = "teacher", "scratch", "teacher_cache", "explain"
CE_ONLY = (TEACHER, SCRATCH)  # roles whose only loss is cross-entropy: they learn from labels, never a teacher
BASE_VARIANT = "base"  # the clean data: where a variant's teacher lives unless study.teacher_regime = "variant"
FAMILY_TAG = "@"
GRID_TAG = "~"  # kd~2: the third candidate of method kd's hyper-parameter grid (edgekd.config.method_grid)
PRUNE_TAG = "+prune"  # kd+prune50: the kd student with half its channels pruned, then fine-tuned
SEED_PREFIX = "seed"


@dataclass(frozen=True)
class Role:
    base: str  # teacher | teacher_cache | scratch | explain | <method>[~k | +pruneNN]
    family: str = ""  # after '@': a named teacher for `teacher`, a student family otherwise

    @classmethod
    def parse(cls, text: str) -> Role:
        base, _, family = text.partition(FAMILY_TAG)
        return cls(base, family)

    def __str__(self) -> str:
        return f"{self.base}{FAMILY_TAG}{self.family}" if self.family else self.base

    @property
    def suffix(self) -> str:
        """`@family` (or '' for the default family): what another role of the same family ends with."""
        return f"{FAMILY_TAG}{self.family}" if self.family else ""

    def with_base(self, base: str) -> Role:
        """The role of the same family with another base (the kd student a `kd+prune50` run starts from)."""
        return Role(base, self.family)

    @property
    def is_teacher(self) -> bool:
        return self.base == TEACHER

    @property
    def ce_only(self) -> bool:
        return self.base in CE_ONLY

    @property
    def is_method(self) -> bool:
        """A KD student (of a method, a grid candidate or a pruned student)."""
        return self.base not in (TEACHER, SCRATCH, CACHE, EXPLAIN)

    @property
    def grid(self) -> tuple[str, int] | None:
        """`kd~2` -> ("kd", 2): a candidate run of a method's hyper-parameter grid; None for any other role."""
        method, tag, index = self.base.partition(GRID_TAG)
        return (method, int(index)) if tag else None

    @property
    def pruned(self) -> tuple[str, float] | None:
        """`kd+prune50` -> ("kd", 0.5): the student a pruned run starts from and the share of channels removed."""
        source, tag, percent = self.base.partition(PRUNE_TAG)
        return (source, int(percent) / 100) if tag else None


def grid_role(method: str, index: int) -> str:
    return f"{method}{GRID_TAG}{index}"


def pruned_role(source: str, share: float) -> str:
    return f"{source}{PRUNE_TAG}{round(share * 100)}"


def pruned_source(method: str) -> str | None:
    """The method a pruned role's name starts from (`kd+prune50` -> `kd`), None for any other name."""
    return Role(method).pruned[0] if PRUNE_TAG in method else None


def teacher_role(name: str = "") -> str:
    """`teacher` for the main teacher, `teacher@<name>` for a named one ([teachers.<name>])."""
    return str(Role(TEACHER, name))


@dataclass(frozen=True)
class Label:
    """A job's place in the study: `<dataset>/<variant>/<role>/seed<k>[/<output>]`."""

    dataset: str
    variant: str
    role: str
    seed: int
    output: str = ""  # what a deploy job makes in the run directory: bundle, bench-<backend>-<device>

    def __str__(self) -> str:
        base = f"{self.dataset}/{self.variant}/{self.role}/{SEED_PREFIX}{self.seed}"
        return f"{base}/{self.output}" if self.output else base

    @classmethod
    def parse(cls, text: str) -> Label:
        dataset, variant, role, seed, *output = text.split("/")
        return cls(dataset, variant, role, int(seed.removeprefix(SEED_PREFIX)), "/".join(output))


_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def segment_problem(name: str, what: str) -> str | None:
    """Why `name` cannot be one directory level of a run's path (None: it can). A variant named `a/b` would become
    two levels and a method named `..` would leave the study, so names are letters, digits, `_`, `-` and `.`."""
    if _SEGMENT.match(name) and name not in (".", ".."):
        return None
    return (f"{what} {name!r} cannot name a directory: use letters, digits, '_', '-' and '.', starting with a letter "
            "or digit")
