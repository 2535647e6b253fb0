"""``DualSpatialAttention``: the paper's DSA module (Section 3.1, Fig. 3) as a drop-in layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops.ops import BACKENDS, dual_masked_attention

Tensor = torch.Tensor

DEFAULT_MASK_THRESHOLD = 0.5


def reduce_hole_mask(hole_mask: Tensor, size: tuple[int, int],
                     threshold: float = DEFAULT_MASK_THRESHOLD) -> Tensor:
    """Foreground (hole) mask at feature resolution: ``(B, 1, h, w)`` → ``(B, H·W)`` bool.

    A mask at a higher resolution is reduced by adaptive max-pooling: a feature pixel is
    foreground if any image pixel it covers is missing (non-divisible sizes use PyTorch's
    adaptive windows, which overlap rather than drop pixels). A mask at a lower
    resolution is upsampled with nearest neighbours. Values > ``threshold`` count as
    missing (0.5 for binary masks; 0 makes any non-zero value missing, as PEN-Net does).
    """
    if hole_mask.dim() != 4 or hole_mask.shape[1] != 1:
        raise ValueError(f"hole_mask must have shape (B, 1, h, w); got {tuple(hole_mask.shape)}")
    mask = hole_mask.float()
    if mask.shape[-2:] != size:
        if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
            mask = F.adaptive_max_pool2d(mask, size)
        else:
            mask = F.interpolate(mask, size=size, mode="nearest")
    return (mask > threshold).flatten(1)


def _channels_last_rows(features: Tensor) -> Tensor:
    """``features (B, C, H, W)`` → ``(B, H·W, C)`` contiguous: one pixel per row, so the
    attention gathers whole rows. Transposed a sample at a time: ATen blocks a 2-D
    transposing copy for the caches, not a 3-D one (3× faster at 64×64×128)."""
    batch, channels = features.shape[:2]
    rows = features.new_empty((batch, features[0, 0].numel(), channels))
    for sample in range(batch):
        rows[sample].copy_(features[sample].flatten(1).t())
    return rows


def _pointwise_channels_last(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1×1 convolution of ``features (B, C, H, W)`` with ``weight (O, C, 1, 1)`` written as
    ``(B, H·W, O)``: one batched GEMM ``Xᵀ·Wᵀ`` straight into channels-last, so the attention
    kernels gather whole rows with vector loads (the conv layout would make every row a
    strided gather). No copy of ``features``."""
    pixels = features.flatten(2).transpose(1, 2)  # (B, L, C), a view
    return torch.baddbmm(bias, pixels, weight.flatten(1).t().expand(features.shape[0], -1, -1))


class DualSpatialAttention(nn.Module):
    """Cross (foreground → background) and self (foreground → foreground) attention.

    ``Y = α·Pad(cross) + X``, ``Y' = β·Pad(self) + X``, output ``fuse(Y + Y')`` with
    α = β = 0 at initialisation (the module starts as ``fuse(2·X)``).

    Args:
        channels: C of the feature map; V has C channels.
        qk_dim: channels of Q and K (default ``max(C // 8, 8)``).
        fuse_kernel_size: kernel size of the fusion convolution (the paper does not say; 1).
        scale: multiplies ``q·k`` before the softmax (the paper uses 1).
        backend: forwarded to ``dsa_ops.masked_attention``.
        mask_threshold: hole-mask values above it count as missing (default 0.5, for
            binary masks; 0 makes any non-zero value missing, PEN-Net's rule).
        guide_channels: channels of a ``guide`` tensor with its own Q/K projection (then every
            call needs a guide). ``None``: a guide, if given, has C channels and shares the
            Q/K weights that ``x`` would use (the paper's oracle path).

    Shapes: ``x (B, C, H, W)``, ``hole_mask (B, 1, h, w)`` with 1 = missing at any
    resolution (see ``reduce_hole_mask``) or ``None`` (nothing missing: the output is
    ``fuse(2·X)``), optional ``guide (B, G, H, W)`` from which queries and keys are projected
    while values come from ``x`` (cross-scale matching: PEN-Net scores on a coarser level
    and pastes the finer one) → ``(B, C, H, W)``; with ``return_attention`` also
    ``{"cross": (B, L, L), "self": (B, L, L)}`` with ``L = H·W``.
    """

    def __init__(self, channels: int, qk_dim: int | None = None, fuse_kernel_size: int = 1,
                 scale: float = 1.0, backend: str = "auto",
                 mask_threshold: float = DEFAULT_MASK_THRESHOLD, guide_channels: int | None = None):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}")
        if fuse_kernel_size <= 0 or fuse_kernel_size % 2 == 0:
            raise ValueError(f"fuse_kernel_size must be a positive odd integer; got {fuse_kernel_size}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {backend!r}")
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1) (values above it are missing); "
                             f"got {mask_threshold}")
        if guide_channels is not None and guide_channels <= 0:
            raise ValueError(f"guide_channels must be positive or None; got {guide_channels}")
        self.channels = channels
        self.qk_dim = qk_dim if qk_dim is not None else max(channels // 8, 8)
        self.scale = scale
        self.backend = backend
        self.mask_threshold = mask_threshold
        self.guide_channels = guide_channels
        if guide_channels is None:
            # One 1×1 convolution holds Q, K, V of both branches:
            # [q_cross, k_cross, v_cross, q_self, k_self, v_self]. The GPU path applies it as
            # one GEMM; the CPU path applies the Q/K rows before the attention and the V rows
            # after it (``_project_attended_values``).
            self.projection = nn.Conv2d(channels, 2 * (2 * self.qk_dim + channels), kernel_size=1)
        else:
            # Values from x: [v_cross, v_self]; queries and keys from the guide:
            # [q_cross, k_cross, q_self, k_self].
            self.projection = nn.Conv2d(channels, 2 * channels, kernel_size=1)
            self.guide_projection = nn.Conv2d(guide_channels, 4 * self.qk_dim, kernel_size=1)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))
        self.fuse = nn.Conv2d(channels, channels, fuse_kernel_size, padding=fuse_kernel_size // 2)

    def extra_repr(self) -> str:
        guide = "" if self.guide_channels is None else f", guide_channels={self.guide_channels}"
        return (f"channels={self.channels}, qk_dim={self.qk_dim}, scale={self.scale}, "
                f"backend={self.backend!r}, mask_threshold={self.mask_threshold}{guide}")

    def _fail(self, message: str, error: type = ValueError):
        raise error(f"{type(self).__name__}: {message}")

    def _check_features(self, name: str, tensor: Tensor, channels: int, like: Tensor | None) -> None:
        """One-line errors for a feature input: shape, and dtype/device against the weights."""
        if not isinstance(tensor, torch.Tensor):
            self._fail(f"{name} must be a tensor of shape (B, {channels}, H, W); got "
                       f"{type(tensor).__name__}", TypeError)
        if tensor.dim() != 4 or tensor.shape[1] != channels:
            expected = "H, W" if like is None else f"{like.shape[2]}, {like.shape[3]}"
            self._fail(f"{name} must have shape (B, {channels}, {expected}); got {tuple(tensor.shape)}")
        if like is not None and (tensor.shape[0] != like.shape[0] or tensor.shape[2:] != like.shape[2:]):
            self._fail(f"{name} must have the batch size and spatial size of x "
                       f"{tuple(like.shape)}; got {tuple(tensor.shape)}")
        weight = self.projection.weight
        if tensor.device != weight.device:
            self._fail(f"{name} is on {tensor.device} but the module's weights are on "
                       f"{weight.device}: move {name} there or call module.to({str(tensor.device)!r})")
        if not tensor.is_floating_point():
            self._fail(f"{name} must be a floating-point tensor; got {tensor.dtype}", TypeError)
        if tensor.dtype != weight.dtype and not torch.is_autocast_enabled(tensor.device.type):
            self._fail(f"{name} is {str(tensor.dtype).removeprefix('torch.')} but the module's weights "
                       f"are {str(weight.dtype).removeprefix('torch.')}: cast {name} to "
                       f"{str(weight.dtype).removeprefix('torch.')} or run under autocast", TypeError)

    def _check_inputs(self, x: Tensor, hole_mask: Tensor | None, guide: Tensor | None) -> None:
        self._check_features("x", x, self.channels, None)
        if hole_mask is not None:
            if not isinstance(hole_mask, torch.Tensor):
                self._fail(f"hole_mask must be a tensor of shape (B, 1, h, w) or None; got "
                           f"{type(hole_mask).__name__}", TypeError)
            if hole_mask.dim() != 4 or hole_mask.shape[1] != 1:
                self._fail(f"hole_mask must have shape (B, 1, h, w); got {tuple(hole_mask.shape)}")
            if hole_mask.shape[0] != x.shape[0]:
                self._fail(f"hole_mask must have batch size {x.shape[0]} like x; "
                           f"got {tuple(hole_mask.shape)}")
        if guide is None:
            if self.guide_channels is not None:
                self._fail(f"guide is required: the module was built with "
                           f"guide_channels={self.guide_channels}")
            return
        guide_channels = self.channels if self.guide_channels is None else self.guide_channels
        self._check_features("guide", guide, guide_channels, x)

    def _foreground(self, x: Tensor, hole_mask: Tensor | None) -> Tensor:
        """``(B, H·W)`` bool: the hole at ``x``'s resolution; all False for ``None``."""
        if hole_mask is None:
            return torch.zeros(x.shape[0], x.shape[2] * x.shape[3], dtype=torch.bool, device=x.device)
        return reduce_hole_mask(hole_mask.to(x.device), tuple(x.shape[-2:]), self.mask_threshold)

    def _gated_projection(self) -> tuple[Tensor, Tensor]:
        """The projection's ``(weight (O, C, 1, 1), bias (O,))`` with the value rows of the
        cross branch scaled by α/2 and those of the self branch by β/2: ``α·(P·V) = P·(α·V)``,
        so the gates cost a pass over the small weight instead of two over the outputs; the
        halves let ``_fuse`` take ``X + (cross + self)/2`` with the 2 in its weight."""
        weight, bias = self.projection.weight, self.projection.bias
        qk, channels = self.qk_dim, self.channels
        ones = weight.new_ones(2 * qk)
        # Halving is exact (a power of two).
        cross_gate, self_gate = ((gate.to(weight.dtype) / 2).expand(channels) for gate in (self.alpha, self.beta))
        if self.guide_channels is None:  # rows [q_cross, k_cross, v_cross, q_self, k_self, v_self]
            gates = torch.cat([ones, cross_gate, ones, self_gate])
        else:  # rows [v_cross, v_self]
            gates = torch.cat([cross_gate, self_gate])
        return weight * gates[:, None, None, None], bias * gates

    def _value_rows(self) -> tuple[slice, slice]:
        """The projection's rows that make the cross and the self branch's values."""
        qk, channels = self.qk_dim, self.channels
        if self.guide_channels is None:  # rows [q_cross, k_cross, v_cross, q_self, k_self, v_self]
            return slice(2 * qk, 2 * qk + channels), slice(4 * qk + channels, 4 * qk + 2 * channels)
        return slice(0, channels), slice(channels, 2 * channels)  # rows [v_cross, v_self]

    def _project_queries_keys(self, x: Tensor, guide: Tensor | None
                              ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((q, k) cross, (q, k) self)``, each ``(B, L, Dqk)``, from ``guide`` (or ``x``): one
        GEMM over the Q/K rows alone (no values)."""
        qk, channels = self.qk_dim, self.channels
        if self.guide_channels is None:
            weight, bias = self.projection.weight, self.projection.bias
            rows = [slice(0, 2 * qk), slice(2 * qk + channels, 4 * qk + channels)]
            weight = torch.cat([weight[r] for r in rows])
            bias = torch.cat([bias[r] for r in rows])
        else:
            weight, bias = self.guide_projection.weight, self.guide_projection.bias
        features = x if guide is None else guide
        q_cross, k_cross, q_self, k_self = _pointwise_channels_last(features, weight, bias).split(qk, dim=2)
        return (q_cross, k_cross), (q_self, k_self)

    def _project(self, x: Tensor, guide: Tensor | None = None
                 ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """``((q, k, v) cross, (q, k, v) self)``: q, k ``(B, L, Dqk)`` from ``guide`` (or ``x``),
        v ``(B, L, C)`` from ``x (B, C, H, W)``, all with unit-stride channels (slices of
        channels-last GEMM outputs, see ``_pointwise_channels_last``)."""
        qk, channels = self.qk_dim, self.channels
        weight, bias = self._gated_projection()
        if guide is None:
            q_cross, k_cross, v_cross, q_self, k_self, v_self = _pointwise_channels_last(
                x, weight, bias).split([qk, qk, channels] * 2, dim=2)
            return (q_cross, k_cross, v_cross), (q_self, k_self, v_self)
        # Q/K from the guide (their gates are 1), V from x: two GEMMs.
        (q_cross, k_cross), (q_self, k_self) = self._project_queries_keys(x, guide)
        cross_rows, self_rows = self._value_rows()
        value_weight = torch.cat([weight[cross_rows], weight[self_rows]])
        value_bias = torch.cat([bias[cross_rows], bias[self_rows]])
        v_cross, v_self = _pointwise_channels_last(x, value_weight, value_bias).split(channels, dim=2)
        return (q_cross, k_cross, v_cross), (q_self, k_self, v_self)

    def forward(self, x: Tensor, hole_mask: Tensor | None = None, return_attention: bool = False,
                guide: Tensor | None = None):
        y, maps, _ = self.attend(x, hole_mask, guide, return_attention=return_attention)
        return (y, maps) if return_attention else y

    def attend(self, x: Tensor, hole_mask: Tensor | None = None, guide: Tensor | None = None, *,
               return_attention: bool = False, cross_extra_values: Tensor | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None, Tensor | None]:
        """``forward``'s work, returning ``(y, maps or None, extra or None)``.

        ``cross_extra_values (B, L, E)``: more values for the cross branch, appended to its
        ``V`` so they share its one attention pass (no second softmax); ``extra (B, L, E)`` is
        their attention-weighted mean per hole pixel (zero elsewhere and where a sample has no
        background). ``dsa_ops.adapters`` attends over pixel coordinates this way.
        """
        self._check_inputs(x, hole_mask, guide)
        _, _, height, width = x.shape
        foreground = self._foreground(x, hole_mask)
        # The attention's temporaries (projections, both branches' outputs) are freed before
        # the fusion allocates its output: with the smaller peak glibc keeps the top of its
        # heap instead of returning it, whose page faults cost ~1 ms a call at layer 14.
        half, maps, extra = self._attend_half(x, foreground, guide, return_attention,
                                              cross_extra_values)
        return self._fuse_doubled(half, height, width), maps, extra

    def _attend_half(self, x: Tensor, foreground: Tensor, guide: Tensor | None,
                     return_attention: bool, cross_extra_values: Tensor | None):
        """``(X + (α·cross + β·self)/2 (B, C, L), maps or None, extra or None)``."""
        values_after = self._values_after_attention(x)
        cross_inputs, self_inputs = self._op_inputs(x, guide, values_after)
        v_cross = cross_inputs[2]
        if cross_extra_values is not None:
            v_cross = torch.cat([v_cross, cross_extra_values.to(v_cross.dtype)], dim=2)
        # Both branches in one call: on "cuda" and "triton" one fused launch per kernel.
        branches = dual_masked_attention(*cross_inputs[:2], v_cross, *self_inputs, foreground,
                                         scale=self.scale, return_attention=return_attention,
                                         backend=self.backend)
        cross, self_ = branches[:2]
        extra = None
        if cross_extra_values is not None:
            cross, extra = cross.split([x.shape[1], cross_extra_values.shape[2]], dim=2)
        if values_after:
            half = self._project_attended_values(cross, self_, self_inputs[2], foreground)
        else:
            # The gates, halved, are in the values (``_gated_projection``), so
            # Y + Y' = 2·X + α·cross + β·self = 2·(X + cross + self) here; x first keeps its layout.
            half = x.flatten(2) + (cross + self_).transpose(1, 2)  # (B, C, L)
        return half, (branches[2] if return_attention else None), extra

    def _values_after_attention(self, x: Tensor) -> bool:
        """Whether this call attends over ``x`` itself and projects the values after (on the
        CPU backends: ``_project_attended_values``), or attends over values projected at every
        pixel (the GPU backends: fused kernels, nothing waits for the host)."""
        # "auto" resolves to "cpu" or "reference" on CPU tensors. torch.compile gets the
        # projected values: the foreground's positions are a data-dependent shape.
        return (x.device.type == "cpu" and self.backend in ("auto", "cpu", "reference")
                and not torch.compiler.is_compiling())

    def _op_inputs(self, x: Tensor, guide: Tensor | None, values_after: bool | None = None
                   ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """``((q, k, v) cross, (q, k, v) self)`` the dual op takes in this call: the projected
        values (``_project``), or with ``values_after`` (default ``_values_after_attention``)
        ``x``'s own pixels ``(B, L, C)`` as both branches' values."""
        if values_after is None:
            values_after = self._values_after_attention(x)
        if not values_after:
            return self._project(x, guide)
        (q_cross, k_cross), (q_self, k_self) = self._project_queries_keys(x, guide)
        pixels = _channels_last_rows(x)
        return (q_cross, k_cross, pixels), (q_self, k_self, pixels)

    def _project_attended_values(self, cross: Tensor, self_: Tensor, pixels: Tensor,
                                 foreground: Tensor) -> Tensor:
        """``X + (α·cross + β·self)/2`` ``(B, C, L)`` from the branches' attention over ``x``
        itself (``cross``, ``self_`` ``(B, L, C)``: P·X, zero off the foreground; ``pixels``
        ``(B, L, C)``: x): the value projection moved after the attention, P·(X·Wᵀ + b) =
        (P·X)·Wᵀ + b on rows that have keys (P's rows sum to 1). The value weights of both
        branches apply in one GEMM to the foreground rows only, instead of to every pixel
        twice: at layer 14 (64×64, a 32×32 hole) a quarter of the value GEMM, and no
        (B, L, 2C) projection to write. The foreground's positions come to the host (free on
        the CPU, a synchronisation on a GPU, hence CPU backends only)."""
        batch, length, channels = pixels.shape
        samples, positions = foreground.nonzero(as_tuple=True)
        rows = samples * length + positions
        attended = torch.cat([branch.reshape(-1, channels).index_select(0, rows)
                              for branch in (cross, self_)], dim=1)  # (N, 2C)
        weight, bias = self._gated_projection()  # value rows gated by α/2 and β/2
        cross_rows, self_rows = self._value_rows()
        weight = weight.flatten(1)
        value_weight = torch.cat([weight[cross_rows], weight[self_rows]], dim=1)  # (C, 2C)
        # The biases reach a row through its softmax weights, which sum to 1 where the branch
        # has keys: always for the self branch (a hole pixel is its own key), for the cross
        # branch when the sample has background.
        has_background = (~foreground).any(dim=1)
        if bool(has_background.all()):
            row_bias = bias[self_rows] + bias[cross_rows]  # (C,), every row alike
        else:
            row_bias = (bias[self_rows]
                        + has_background[samples].unsqueeze(1).to(bias.dtype) * bias[cross_rows])
        values = torch.addmm(row_bias, attended, value_weight.t())  # (α·cross + β·self)/2
        half_rows = pixels.reshape(-1, channels).index_add(0, rows, values)  # (B·L, C)
        return half_rows.view(batch, length, channels).transpose(1, 2)  # (B, C, L) view

    def _fuse_doubled(self, half: Tensor, height: int, width: int) -> Tensor:
        """``fuse(2·half)`` for ``half (B, C, H·W)`` (any strides: the CPU path hands in a
        channels-last buffer) → ``(B, C, H, W)`` contiguous, the 2 folded into the weight; the
        1×1 case as one batched GEMM ``2W·X + b``, which reads either layout at full speed
        (the convolution's CPU path for 1×1 is slower)."""
        batch, channels, _ = half.shape
        weight, bias = 2 * self.fuse.weight, self.fuse.bias
        if self.fuse.kernel_size != (1, 1):  # the module's own convolution, with 2·weight
            # Contiguous in, contiguous out (a channels-last input makes a channels-last output).
            return self.fuse._conv_forward(half.contiguous().view(batch, channels, height, width),
                                           weight, bias)
        return torch.baddbmm(bias[:, None], weight.flatten(1).expand(batch, -1, -1),
                             half).view(batch, -1, height, width)

    def queries_keys(self, x: Tensor, hole_mask: Tensor | None = None, guide: Tensor | None = None
                     ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """What the attention compares, without attending: the foreground ``(B, L)`` bool
        and each branch's ``(q, k)`` ``(B, L, Dqk)`` (unit-stride channels; the Q/K rows of the
        projection alone, no values). The cross branch's queries/keys are foreground/background,
        the self branch's foreground/foreground; scores are ``self.scale·q·kᵀ``. With those,
        ``dsa_ops.attention_kl`` compares two passes' attention without any L×L map.
        """
        self._check_inputs(x, hole_mask, guide)
        foreground = self._foreground(x, hole_mask)
        (q_cross, k_cross), (q_self, k_self) = self._project_queries_keys(x, guide)
        return foreground, {"cross": (q_cross, k_cross), "self": (q_self, k_self)}
