"""Launching past one machine: the schedulers' variables mapped onto LLaMA-Factory's launch
variables (schedulers), the files a scheduler runs (slurm's launch.sbatch, a Kubeflow PyTorchJob,
a SkyPilot task), Slurm's job control (slurm), and Ray (ray, ray_driver).

Commands are built here as text and argv; running them is qwenft.proc.launcher's.
"""
