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


def _one_training_step(rank: int, world_size: int, port: int, sync_bn: bool, out: str,
                       dtype: torch.dtype = torch.float64) -> None:
    """One ``training_step`` of a narrow model on this process's slice of a fixed global
    batch of 4; rank 0 saves the resulting state. SGD(lr=1): the parameter change is the
    gradient itself (RMSprop's first step is ≈ lr·sign(g), which hides small differences).
    In float64 by default (see the test below for why)."""
    import torch.distributed as dist

    from oracleface.data.landmarks import boxes_tensor, canonical_landmarks, component_boxes
    from oracleface.losses import LossWeights
    from oracleface.data.masks import random_rectangle_mask
    from oracleface.training.step import OracleFaceModel, all_reduce_gradients
    from oracleface.training.sync_batchnorm import synchronise_batchnorm
    from oracleface.training.trainer import ZeroPerceptual

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
    generator = torch.Generator().manual_seed(0)
    boxes = boxes_tensor(component_boxes(canonical_landmarks(256), 256))
    batch = {"image": torch.rand(4, 3, 256, 256, generator=generator, dtype=dtype),
             "hole_mask": torch.stack([random_rectangle_mask(256, generator) for _ in range(4)]),
             "boxes": torch.stack([boxes] * 4)}
    local = {name: value.chunk(world_size)[rank] for name, value in batch.items()}
    torch.manual_seed(0)
    # γ = 0: the gradient penalty's random interpolation (drawn per process) has no effect.
    model = OracleFaceModel(256, attention="none", width=0.125, perceptual=ZeroPerceptual(),
                            weights=LossWeights(gradient_penalty=0.0)).to(dtype)
    if world_size > 1 and sync_bn:
        synchronise_batchnorm(model.generator, torch.device("cpu"))
    g_optimizer = torch.optim.SGD(model.generator.parameters(), lr=1.0)
    d_optimizer = torch.optim.SGD(model.discriminator.parameters(), lr=1.0)
    model.training_step(local, g_optimizer, d_optimizer,
                        gradient_sync=all_reduce_gradients if world_size > 1 else None)
    if rank == 0:
        torch.save(model.state_dict(), out)
    if world_size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# One process and two differ only in how sums split across processes. In float64 that
# rounding (ε = 1.1e-16, times the step's amplification: measured ≤ 3e-14 absolute on the
# AVX-512 and the forced AVX2 paths) is far below this bound on any CPU, and per-process
# BatchNorm (what the test must catch) moves parameters by ≥ 1e-3, far above it. In float32
# the same comparison depends on the CPU: the AVX2 oneDNN kernels' sums over 4 × 256² pixels
# put the two runs 2.7e-5 apart (AVX-512: 2e-6), past any bound a bug could not also meet.
FLOAT64_ATOL, FLOAT64_RTOL = 1e-10, 1e-8


@pytest.mark.slow
def test_two_processes_with_synchronised_batchnorm_step_like_one_process(tmp_path):
    """The global batch of 4 as 2 gloo processes × 2 samples gives the parameters (and
    BatchNorm running statistics) of one process on all 4, to float64 rounding; per-process
    BatchNorm does not."""
    import torch.multiprocessing as mp

    _one_training_step(0, 1, 0, True, str(tmp_path / "one.pt"))
    for sync_bn in (True, False):
        mp.spawn(_one_training_step, args=(2, _free_port(), sync_bn, str(tmp_path / f"two_{sync_bn}.pt")),
                 nprocs=2)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    synchronised = torch.load(tmp_path / "two_True.pt", weights_only=True)
    per_process = torch.load(tmp_path / "two_False.pt", weights_only=True)
    assert one.keys() == synchronised.keys()
    assert one["generator.layers.1.0.weight"].dtype == torch.float64
    for name in one:
        torch.testing.assert_close(synchronised[name], one[name], atol=FLOAT64_ATOL, rtol=FLOAT64_RTOL,
                                   msg=name)
    differing = [name for name in one if name.startswith("generator.")
                 and not torch.allclose(per_process[name], one[name], atol=FLOAT64_ATOL, rtol=FLOAT64_RTOL)]
    assert any("running_mean" in name for name in differing) and any(name.endswith("weight") for name in differing)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_synchronised_batchnorm_keeps_the_module_dtype(dtype):
    """The converted layers keep the model's dtype (they were rebuilt in float32, so a float64
    model's BatchNorm weights were rounded to float32 and updated there)."""
    from oracleface.training.sync_batchnorm import GlobalBatchNorm2d, synchronise_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(dtype)
    with torch.no_grad():
        model[1].weight.fill_(1 + 2 ** -30)  # not a float32 value
    converted = synchronise_batchnorm(model, torch.device("cpu"))[1]
    assert isinstance(converted, GlobalBatchNorm2d)
    for name, tensor in (*converted.named_parameters(), *converted.named_buffers()):
        expected = torch.int64 if name == "num_batches_tracked" else dtype
        assert tensor.dtype == expected, name
    assert torch.equal(converted.weight, torch.full((4,), 1 + 2 ** -30, dtype=dtype))
