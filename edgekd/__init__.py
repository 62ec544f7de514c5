"""edgekd: does knowledge distillation pay off on my dataset, on my edge device?

Stages, each reading and writing a run directory: data -> models -> distill -> export -> bench -> report.
"""

__version__ = "0.1.0"
