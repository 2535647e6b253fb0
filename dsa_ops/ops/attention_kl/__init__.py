"""The streaming attention KL (oracle supervision): op, backends, kernels.

``op`` defines the op and ``attention_kl``; ``reference``, ``cpu`` and ``triton``
implement the backends; the cuda backend is in csrc/attention_kl/.
"""
