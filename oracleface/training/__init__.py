"""Training: the config (``config``), the model step (``step``), the trainer (``trainer``),
checkpoints (``checkpoint``), what ``--resume`` continues (``resume``), one trainer per run
folder (``run_lock``), devices and processes (``runtime``) and BatchNorm over the global
batch (``sync_batchnorm``)."""
