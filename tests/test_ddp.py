"""Two processes on the CPU (gloo) under torchrun: the same ``oracleface train`` command."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.slow
def test_two_process_training_on_the_cpu(tmp_path):
    data = tmp_path / "faces"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):  # 8 train images after the 10 % hold-out
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC).save(data / f"face{i}.png")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "oracleface", "train", "--data", str(data), "--out", str(run), "--steps", "2",
               "--batch-size", "4", "--workers", "0", "--width", "0.125", "--attention", "none",
               "--lambda-perceptual", "0", "--device", "cpu", "--no-progress", "--log-every", "1",
               "--sample-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("trained to step 2") == 1  # rank 0 reports, rank 1 stays quiet

    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2  # every process's RNG state
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks seeded apart
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)  # 8 images / (2 ranks × 2) = 2 batches
    assert len(list((run / "tensorboard").iterdir())) == 1  # rank 0 logs alone
    assert (run / "samples" / "step_00000002.png").is_file()
