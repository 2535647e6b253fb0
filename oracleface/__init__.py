"""oracleface: the face-completion model of "Learning Oracle Attention for High-fidelity
Face Completion" (Zhou et al., CVPR 2020), built on dsa_ops."""
__version__ = "0.1.0"
