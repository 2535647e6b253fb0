"""Masked attention and its dual-branch form (both DSA branches): op, backends, kernels.

``op`` and ``dual`` define the ops and their public functions; ``reference``, ``cpu``,
``triton`` (+ ``triton_kernels``) implement the backends; the cuda backend is in csrc/.
"""
