"""The compound adapter on one module: its parameters, its rotation and the wrapped layer.

The adapter multiplies the layer's *input* by a block-diagonal matrix R, exactly where and
how PEFT's OFT does (``x -> x @ blockdiag(R_1..R_r)`` before the base layer), so that a
trained adapter maps one-to-one onto PEFT's OFT checkpoint form (see ``export.py``):

    y = base_layer(x @ R),   R = blockdiag(B_1, ..., B_r),
    B_i = B_i^(1) B_i^(2) ... B_i^(num_adapters),
    B_i^(a) = C_{k1}(U_i^(a)) (+) C_{k2}(U_i^(a)) (+) ... (+) I_pad

where ``(+)`` is the direct sum. With several adapters (``num_adapters``) the block matrices
are multiplied in order (``B_i = B_i^(1) B_i^(2) ...``); the product of matrices with the
same block layout keeps that layout, so it is done per compound segment. U^(a)_i is the
Cayley transform of a skew-symmetric parameter (``orthogonal=True``) or ``I + P`` with a
free P (``orthogonal=False``); all parameters start at zero, so R = I at step 0.

It wraps ``nn.Linear`` and GPT-2's ``transformers.pytorch_utils.Conv1D`` alike: both consume
the last input dimension, so rotating the input is layout-independent (Conv1D's transposed
weight only matters when computing merged weights, see ``effective_weight``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpa.methods.compound.minors import (
    BlockLayout,
    cayley,
    compound_matrix,
    skew_from_vector,
)
from qpa.methods.compound.options import CompoundOptions

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def layer_widths(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"compound adapters support nn.Linear and Conv1D, not {type(layer).__name__}")


class CompoundAdapter(nn.Module):
    """The trainable part of one adapted module: ``weight`` plus the maths that turns it into R.

    ``weight`` has shape (num_adapters, num_unitaries, m) with num_unitaries = 1 under
    ``block_share`` (else ``blocks``) and m = n(n-1)/2 Cayley coordinates (``orthogonal``) or
    n*n free entries (not orthogonal).
    """

    def __init__(self, layout: BlockLayout, options: CompoundOptions,
                 device: torch.device | None = None):
        super().__init__()
        self.layout = layout
        self.num_adapters = options.num_adapters
        self.num_unitaries = 1 if options.block_share else layout.blocks
        self.orthogonal = options.orthogonal
        self.reduction = options.reduction
        n = layout.n
        per_unitary = n * (n - 1) // 2 if self.orthogonal else n * n
        # Zeros: Cayley(0) = I and I + 0 = I, so the adapted model starts as the base model.
        self.weight = nn.Parameter(
            torch.zeros(self.num_adapters, self.num_unitaries, per_unitary, device=device)
        )

    def _weight(self, dtype: torch.dtype | None) -> torch.Tensor:
        # Export recomputes R in float64 from the trained fp32 parameters.
        return self.weight if dtype is None else self.weight.to(dtype)

    def unitaries(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U for every adapter and block: (num_adapters, num_unitaries, n, n)."""
        n = self.layout.n
        weight = self._weight(dtype)
        if self.orthogonal:
            return cayley(skew_from_vector(weight, n))
        eye = torch.eye(n, dtype=weight.dtype, device=weight.device)
        return eye + weight.reshape(*weight.shape[:-1], n, n)

    def segment_matrices(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Per order k (ascending), the product over adapters of C_k: (num_unitaries, d, d)."""
        u = self.unitaries(dtype)
        out = []
        minors2 = None
        for k in self.layout.orders:
            # Orders are ascending, so C_2 (when configured) is reused by C_3's Laplace expansion.
            comp = compound_matrix(u, k, self.reduction, minors2=minors2)
            if k == 2 and self.reduction == "det":
                minors2 = comp
            product = comp[0]
            for adapter in range(1, self.num_adapters):
                product = product @ comp[adapter]
            out.append(product)
        return out

    def rotation_blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The diagonal blocks B_i of R: (num_unitaries, block_size, block_size)."""
        layout = self.layout
        segments = self.segment_matrices(dtype)
        blocks = torch.eye(layout.block_size, dtype=segments[0].dtype, device=self.weight.device)
        blocks = blocks.repeat(self.num_unitaries, 1, 1)
        for (_, start, size), segment in zip(layout.segments, segments, strict=True):
            blocks[:, start:start + size, start:start + size] = segment
        return blocks

    def full_rotation(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R as one dense (in_features, in_features) matrix (for export and tests)."""
        blocks = self.rotation_blocks(dtype)
        if self.num_unitaries == 1:
            blocks = blocks.expand(self.layout.blocks, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R for x of shape (..., in_features), the same contraction PEFT's OFT uses."""
        blocks = self.rotation_blocks()
        layout = self.layout
        shaped = x.reshape(*x.shape[:-1], layout.blocks, layout.block_size)
        if self.num_unitaries == 1:
            rotated = shaped @ blocks[0]
        else:
            rotated = torch.einsum("...rk,rkc->...rc", shaped, blocks)
        return rotated.reshape(x.shape)

    def extra_repr(self) -> str:
        layout = self.layout
        return (f"blocks={layout.blocks}, block_size={layout.block_size}, n={layout.n}, "
                f"orders={list(layout.orders)}, unitaries={self.num_unitaries}, "
                f"adapters={self.num_adapters}, orthogonal={self.orthogonal}, "
                f"reduction={self.reduction}")


class CompoundLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` whose input is rotated by a compound adapter."""

    def __init__(self, base_layer: nn.Module, layout: BlockLayout, options: CompoundOptions):
        super().__init__()
        self.base_layer = base_layer
        self.compound = CompoundAdapter(layout, options, device=base_layer.weight.device)

    @property
    def is_conv1d(self) -> bool:
        return isinstance(self.base_layer, Conv1D)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        # The rotation runs in the adapter's dtype (fp32 by default) as PEFT's OFT does.
        rotated = self.compound.rotate(x.to(self.compound.weight.dtype))
        return self.base_layer(rotated.to(previous_dtype).contiguous(), *args, **kwargs)

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The merged weight, in the base layer's own layout (Linear: W R^T, Conv1D: R W),
        computed in ``dtype`` (default: the base weight's)."""
        weight = self.base_layer.weight
        if dtype is not None:
            weight = weight.to(dtype)
        rotation = self.compound.full_rotation(dtype).to(weight.dtype)
        return rotation @ weight if self.is_conv1d else weight @ rotation.T

    def linear_weight(self) -> torch.Tensor:
        """The base weight as (out_features, in_features), whatever the layer type."""
        weight = self.base_layer.weight
        return weight.T if self.is_conv1d else weight
