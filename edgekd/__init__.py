"""edgekd: does knowledge distillation pay off on my dataset, on my edge device?

Stages, each reading and writing a run directory: data -> models -> distill -> explain -> export -> bench ->
report. Below them: the pipeline (jobs, driver, executors), the torch-free runtime, records, roles and run files;
above them: workflows.py (the composition root) and the CLI. README's Layout section has the map.
"""

__version__ = "0.1.0"
