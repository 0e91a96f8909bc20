"""sdft-lite: Self-Distillation Fine-Tuning with a LoRA student that is its own teacher.

Importing this package is cheap: torch, transformers and friends are imported only by the
modules and commands that need them.
"""

__version__ = "0.1.0"
