"""The pipeline every stage plugs into, below all of them (no stage, no torch, no profile fields).

- `graph`: the `Job` (a place in the study plus a `params` dict), the `JobKind` protocol a stage implements (its
  plan, key, output check and run), the registry of kinds, a job's status, and the plan file.
- `driver`: the status pass, the per-job lock, skip-if-current (once, for every kind), the error log, outcomes.
- `executors`: local / processes / Ray, running plain callables with their resource asks.
- `events`: the `Reporter` protocol a running study talks to.

Stages register their kinds beside their code (edgekd/distill/stage.py, edgekd/explain.py, edgekd/export/stage.py,
edgekd/bench/stage.py); edgekd/workflows.py imports them in stage order and is the one place that composes them.
"""
