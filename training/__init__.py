"""facerec's training system: typed configs, the trainer, checkpoints and distributed set-up.

Run ``python -m training --config training/configs/tiny_cpu.yaml`` (or ``facerec-train``), or
``torchrun --nproc_per_node N -m training --config ...`` on N GPUs. Importing this package reads
no environment and starts no process group.
"""

from training.config import Config, load_config

__all__ = ["Config", "load_config"]
