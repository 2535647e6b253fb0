import os

import torch

# Triton kernels run on the CPU only through the interpreter, and Triton reads this
# variable when kernels are defined: set it before dsa_ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
