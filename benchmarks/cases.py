"""What the benchmarks run: layer configurations, hole masks, problems and their FLOPs.

Configurations are the paper's three DSA layers (Table 6, batch 16, ``Dqk = C/8``) and two
larger maps that only fused kernels can hold (batch 8)::

    layer 12   16×16×512    L =   256   Dqk 64   Dv 512
    layer 13   32×32×256    L =  1024   Dqk 32   Dv 256
    layer 14   64×64×128    L =  4096   Dqk 16   Dv 128
    scale-up  128×128×64    L = 16384   Dqk  8   Dv  64
    scale-up  256×256×32    L = 65536   Dqk  8   Dv  32

``Dqk`` follows ``DualSpatialAttention``'s rule ``max(C // 8, 8)``, so the op benchmarks
measure exactly the shapes the module feeds the op.

Masks are drawn at the 256² image resolution with ``oracleface.data.masks`` (the centre
128×128 hole, or per-sample random rectangles of 13.5–25 % of the area, seeded) and
reduced to the feature map with ``dsa_ops.reduce_hole_mask``, exactly as the module does.
Foreground = hole pixels. Each DSA layer runs two attention branches: ``cross``
(queries = foreground, keys = background) and ``self`` (queries = keys = foreground);
the op benchmarks time each branch as its own case (their shapes differ: at the centre
mask the cross branch has 3× the keys of the self branch), the module benchmarks time
both together.

Two matrices (``--matrix``, ``DSA_BENCH_MATRIX``): ``headline`` (the default; ``in_headline``)
is what the results table must show, within minutes: the three paper layers, both branches,
both passes, every contender, at the centre hole and one dtype (bfloat16 on the GPU,
float32 on the CPU); the module against contextual attention and the oracle loss at
layer 14; one generator training step per contender. ``full`` adds the random holes, the
other dtype, the scale-up maps and the other layers of the module and loss families.

On a machine without a GPU the batch shrinks (``LayerConfig.cpu_batch``; the test id and
``extra_info["batch"]`` say so) to keep the default run within a few minutes on 2 cores;
layer 14 runs at batch 4 there, the size the ``cpu`` backend's speed goals are set at.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from dsa_ops import reduce_hole_mask
from oracleface.data.masks import center_mask, random_rectangle_mask

Tensor = torch.Tensor

IMAGE_SIZE = 256  # masks are drawn at the paper's training resolution
MASK_SEED = 0
DATA_SEED = 1
MASK_KINDS = ("centre", "random")
BRANCHES = ("cross", "self")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
# The paper's time per image for layer 14 (Table 3): DSA 6.4 ms, contextual attention 12.9 ms.
PAPER_MS_PER_IMAGE_LAYER_14 = {"dsa": 6.4, "ca": 12.9}


def benchmark_device() -> torch.device:
    """CUDA when present; ``DSA_BENCH_DEVICE=cpu`` forces the CPU run on a GPU machine."""
    requested = os.environ.get("DSA_BENCH_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = benchmark_device()
ON_GPU = DEVICE.type == "cuda"


def excluded_on_this_device(dtype: str) -> Optional[str]:
    """Why the CPU run leaves out this dtype (None when the case runs)."""
    if not ON_GPU and dtype == "bf16":
        return ("bfloat16 is benchmarked on the GPU only: on the CPU it measures the host's bf16 "
                "matmul support rather than the kernels, and would double the CPU run's time")
    return None


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One feature map the attention runs on: ``(batch, channels, height, width)``."""

    height: int
    width: int
    channels: int
    gpu_batch: int
    cpu_batch: int
    paper_layer: Optional[int] = None  # Table 6 decoder layer, None for the scale-up maps

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}"

    @property
    def length(self) -> int:
        return self.height * self.width

    @property
    def qk_dim(self) -> int:
        return max(self.channels // 8, 8)  # DualSpatialAttention's default

    @property
    def v_dim(self) -> int:
        return self.channels

    @property
    def batch(self) -> int:
        return self.gpu_batch if ON_GPU else self.cpu_batch

    @property
    def id(self) -> str:
        """Test id: the map, the batch, and ``cpu`` when the batch is the reduced CPU one."""
        return f"{self.name}-b{self.batch}" + ("" if ON_GPU else "-cpu")


CONFIGS = (
    LayerConfig(16, 16, 512, gpu_batch=16, cpu_batch=2, paper_layer=12),
    LayerConfig(32, 32, 256, gpu_batch=16, cpu_batch=2, paper_layer=13),
    LayerConfig(64, 64, 128, gpu_batch=16, cpu_batch=4, paper_layer=14),
    LayerConfig(128, 128, 64, gpu_batch=8, cpu_batch=1),
    LayerConfig(256, 256, 32, gpu_batch=8, cpu_batch=1),
)


# ----------------------------------------------------------------------------- matrices
MATRICES = ("headline", "full")
DEFAULT_MATRIX = "headline"
MATRIX_VARIABLE = "DSA_BENCH_MATRIX"
HEADLINE_MASK = "centre"
# bfloat16 is what training under AMP feeds the kernels on a GPU; the CPU runs float32 only.
HEADLINE_DTYPE = "bf16" if ON_GPU else "fp32"
# Wall seconds per collected case (cases that skip at once included), for the duration
# printed before a run: (device type, matrix) → (seconds, where the number comes from).
SECONDS_PER_CASE = {
    ("cpu", "full"): (2.33, "measured: 766 cases in 29:43 wall, 2-core CPU shared with other jobs, "
                            "2026-11-26"),
    ("cpu", "headline"): (3.8, "measured by make bench: 105 cases in 6:41 wall, 2:36 CPU time, "
                               "on a 2-core CPU that other jobs held at load 15-17, 2026-12-03"),
    ("cuda", "full"): (2.0, "not measured yet: the harness's design (0.3 s of timed rounds, "
                            "warm-up, build, check; FlexAttention compiles per shape)"),
    ("cuda", "headline"): (2.0, "not measured yet: the harness's design (0.3 s of timed rounds, "
                                "warm-up, build, check; FlexAttention compiles per shape)"),
}
# The oracle loss's headline layer: 14 on the GPU; 13 on the CPU, where the dense maps fit
# the CPU's memory budget (so the table has its baseline) and the streamed reference takes
# seconds instead of a minute.
ORACLE_KL_HEADLINE_LAYER = 14 if ON_GPU else 13


def in_headline(family: str, config: Optional["LayerConfig"], mask_kind: Optional[str],
                dtype: Optional[str]) -> bool:
    """Whether a case of ``family`` ("op", "module", "oracle-kl", "training") is in the
    headline matrix; None for a parameter the family does not have."""
    if family == "training":
        return True  # one step per contender
    if mask_kind != HEADLINE_MASK or dtype not in (None, HEADLINE_DTYPE) or config is None:
        return False
    if family == "op":
        return config.paper_layer is not None
    if family == "oracle-kl":
        return config.paper_layer == ORACLE_KL_HEADLINE_LAYER
    return config.paper_layer == 14  # module vs CA: the paper's Table 3


def expected_duration(cases: int, matrix: str, device: str) -> str:
    """One line: the run's expected wall time from ``SECONDS_PER_CASE`` and where it comes from."""
    seconds, source = SECONDS_PER_CASE[(device, matrix)]
    total = cases * seconds
    return (f"{matrix} matrix: {cases} cases × ~{seconds:g} s per case on {device} ≈ "
            f"{total / 60:.0f} min{'' if total >= 60 else ' (under a minute)'} ({source})")


# ----------------------------------------------------------------------------- masks
def hole_masks(kind: str, batch: int, device: torch.device = DEVICE) -> Tensor:
    """``(batch, 1, 256, 256)`` float32 hole masks (1 = missing) at image resolution.

    ``"centre"``: the 128×128 centre square for every sample; ``"random"``: one random
    rectangle per sample, seeded, so every contender and dtype sees the same holes.
    """
    if kind == "centre":
        masks = [center_mask(IMAGE_SIZE)] * batch
    elif kind == "random":
        generator = torch.Generator().manual_seed(MASK_SEED)
        masks = [random_rectangle_mask(IMAGE_SIZE, generator) for _ in range(batch)]
    else:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}; got {kind!r}")
    return torch.stack(masks).to(device)


def foreground(config: LayerConfig, holes: Tensor) -> Tensor:
    """Hole pixels at the feature map's resolution: ``(B, L)`` bool (the module's rule)."""
    return reduce_hole_mask(holes, (config.height, config.width))


def branch_masks(fg: Tensor, branch: str) -> tuple[Tensor, Tensor]:
    """``(query_mask, key_mask)`` of a DSA branch: cross = fg→bg, self = fg→fg."""
    if branch == "cross":
        return fg, ~fg
    if branch == "self":
        return fg, fg
    raise ValueError(f"branch must be one of {BRANCHES}; got {branch!r}")


# ----------------------------------------------------------------------------- FLOPs
def pair_count(query_mask: Tensor, key_mask: Tensor) -> int:
    """Σ over samples of Nq·Nk: the query×key pairs that carry useful work."""
    queries = query_mask.sum(dim=1, dtype=torch.int64)
    keys = key_mask.sum(dim=1, dtype=torch.int64)
    return int((queries * keys).sum())


def attention_flops(query_mask: Tensor, key_mask: Tensor, qk_dim: int, v_dim: int,
                    backward: bool) -> int:
    """Useful FLOPs of one masked attention, each sample with its own Nq and Nk.

    Forward: ``2·Nq·Nk·(Dqk + Dv)`` (Q·Kᵀ and P·V). Backward ≈ ``2·Nq·Nk·(3·Dqk + 2·Dv)``
    (recomputed Q·Kᵀ, dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q). Work a contender
    spends on non-query rows or non-key columns is not counted: achieved TFLOP/s is
    useful work per second, the fair measure across dense and compacted contenders.
    """
    pairs = pair_count(query_mask, key_mask)
    flops = 2 * pairs * (qk_dim + v_dim)
    if backward:
        flops += 2 * pairs * (3 * qk_dim + 2 * v_dim)
    return flops


def module_flops(config: LayerConfig, fg: Tensor, backward: bool, fuse_kernel_size: int = 1) -> int:
    """FLOPs of ``DualSpatialAttention``: both branches, the projection GEMM and the fusion conv.

    Convolution backward counts twice its forward (input and weight gradients).
    """
    query_mask, key_mask = branch_masks(fg, "cross")
    attention = attention_flops(query_mask, key_mask, config.qk_dim, config.v_dim, backward)
    query_mask, key_mask = branch_masks(fg, "self")
    attention += attention_flops(query_mask, key_mask, config.qk_dim, config.v_dim, backward)
    pixels = fg.shape[0] * config.length
    projection = 2 * pixels * config.channels * 2 * (2 * config.qk_dim + config.v_dim)
    fuse = 2 * pixels * config.channels * config.channels * fuse_kernel_size ** 2
    convolutions = (projection + fuse) * (3 if backward else 1)
    return attention + convolutions


# ----------------------------------------------------------------------------- problems
@dataclasses.dataclass
class AttentionProblem:
    """The inputs of one masked-attention call, as every op contender receives them.

    ``q, k (B, L, Dqk)``, ``v (B, L, Dv)`` (leaf tensors that require grad when the
    backward is benchmarked), masks ``(B, L)`` bool, ``grad_out (B, L, Dv)`` or None.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    query_mask: Tensor
    key_mask: Tensor
    scale: float
    grad_out: Optional[Tensor]

    @property
    def backward(self) -> bool:
        return self.grad_out is not None

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.q, self.k, self.v


def attention_problem(config: LayerConfig, mask_kind: str, branch: str, dtype: torch.dtype,
                      backward: bool, device: torch.device = DEVICE) -> AttentionProblem:
    """Seeded random Q, K, V for one branch of ``config`` under ``mask_kind`` holes.

    The scale is ``1/√Dqk`` (the module's default is the paper's 1): with unit-variance
    inputs it keeps the softmax away from one-hot, so bfloat16 outputs stay comparable
    across contenders. Timing does not depend on it.
    """
    batch, length = config.batch, config.length
    query_mask, key_mask = branch_masks(foreground(config, hole_masks(mask_kind, batch, device)), branch)
    generator = torch.Generator(device).manual_seed(DATA_SEED)

    def draw(width: int) -> Tensor:
        tensor = torch.randn(batch, length, width, generator=generator, device=device, dtype=dtype)
        return tensor.requires_grad_(backward)

    q, k, v = draw(config.qk_dim), draw(config.qk_dim), draw(config.v_dim)
    grad_out = draw(config.v_dim).detach() if backward else None
    return AttentionProblem(q, k, v, query_mask, key_mask, config.qk_dim ** -0.5, grad_out)


@dataclasses.dataclass
class ModuleProblem:
    """Inputs of one attention module call: ``x (B, C, H, W)`` (a leaf that requires grad
    when the backward is benchmarked), ``holes (B, 1, 256, 256)`` (1 = missing), ``grad_out``."""

    config: LayerConfig
    x: Tensor
    holes: Tensor
    grad_out: Optional[Tensor]

    @property
    def backward(self) -> bool:
        return self.grad_out is not None

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def module_problem(config: LayerConfig, mask_kind: str, dtype: torch.dtype, backward: bool,
                   device: torch.device = DEVICE) -> ModuleProblem:
    """Seeded random features of ``config`` and ``mask_kind`` holes at image resolution."""
    shape = (config.batch, config.channels, config.height, config.width)
    generator = torch.Generator(device).manual_seed(DATA_SEED)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_(backward)
    grad_out = torch.randn(shape, generator=generator, device=device, dtype=dtype) if backward else None
    return ModuleProblem(config, x, hole_masks(mask_kind, config.batch, device), grad_out)


TRAINING_RESOLUTION = 256
TRAINING_BATCH = {"cuda": 16, "cpu": 4}  # the paper trains at 16


@dataclasses.dataclass
class TrainingProblem:
    """One generator training batch: ``images (B, 3, R, R)`` in [0, 1], ``holes (B, 1, R, R)``."""

    resolution: int
    images: Tensor
    holes: Tensor

    @property
    def batch(self) -> int:
        return self.images.shape[0]


def training_problem(mask_kind: str, device: torch.device = DEVICE) -> TrainingProblem:
    batch = TRAINING_BATCH["cuda" if device.type == "cuda" else "cpu"]
    generator = torch.Generator(device).manual_seed(DATA_SEED)
    size = (batch, 3, TRAINING_RESOLUTION, TRAINING_RESOLUTION)
    images = torch.rand(size, generator=generator, device=device)
    return TrainingProblem(TRAINING_RESOLUTION, images, hole_masks(mask_kind, batch, device))
