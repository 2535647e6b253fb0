"""Training: the config (``config``), the model step (``step``), the trainer (``trainer``),
checkpoints (``checkpoint``), devices and processes (``runtime``) and BatchNorm over the
global batch (``sync_batchnorm``)."""
