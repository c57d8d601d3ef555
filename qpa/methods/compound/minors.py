"""Batched compound matrices, the Cayley map and the block layout of compound adapters.

Conventions used throughout ``qpa.methods.compound``:

* The order-k compound C_k(U) of an n x n matrix U is the C(n, k) x C(n, k) matrix of all
  k x k minors: ``C_k(U)[I, J] = det(U[I, J])`` where I and J run over the k-subsets of
  ``{0..n-1}`` in lexicographic order (``torch.combinations`` order). C_1(U) = U.
* ``reduction="det"`` is the true compound. The paper's ablations ``max`` / ``avg`` replace
  the determinant of each k x k submatrix by the maximum (signed, not absolute) / the mean of
  its k*k entries, as in the authors' reference implementation. Applied to U = I these
  reductions do not give the identity (e.g. ``max`` of ``I[{0,1},{0,2}]`` is 1), which would
  break "the adapted model equals the base model at step 0". We therefore anchor them:
  ``C_k^max(U) = max(U[I, J]) - max(I[I, J]) + delta_IJ`` (same for ``avg``). The anchor is a
  constant, so gradients are exactly those of the paper's ablation; only the start differs.
  For k = 1 every reduction is U itself. A property of the ``max`` ablation worth knowing:
  with an orthogonal (Cayley) U and n < 2k, every two k-subsets intersect, so at U = I the
  maximum of every submatrix is a diagonal 1 of U, where the Cayley map has zero derivative:
  U = I is then a stationary point and an adapter with only that order never moves.
* Cayley: ``U = (I - S)(I + S)^-1`` with S skew-symmetric, built from the strictly upper
  triangle (row-major ``torch.triu_indices`` order). This is the convention of PEFT's OFT
  (``OFTRotationModule._cayley_batch`` with ``use_cayley_neumann=False``), so the same
  inverse map converts our blocks to PEFT's stored parameters.

Everything is batched over a leading dimension; index tensors are built once per (n, k)
and cached, so there are no Python loops over minors or permutations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import comb
from typing import Literal

import torch

Reduction = Literal["det", "max", "avg"]


@lru_cache(maxsize=64)
def _subsets_cpu(n: int, k: int) -> torch.Tensor:
    # torch.combinations enumerates k-subsets in lexicographic order, the order we document.
    return torch.combinations(torch.arange(n), r=k).reshape(-1, k)


_DEVICE_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def subset_index(n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All k-subsets of range(n) in lexicographic order, shape (C(n, k), k), cached per device."""
    key = (n, k, str(device))
    cached = _DEVICE_CACHE.get(key)
    if cached is None:
        cached = _subsets_cpu(n, k).to(device)
        _DEVICE_CACHE[key] = cached
    return cached


def _entries(u: torch.Tensor, k: int) -> list[list[torch.Tensor]]:
    """``g[a][b][..., I, J] = u[..., I_a, J_b]`` for all k-subsets I, J: k*k tensors (..., P, P).

    Two ``index_select`` calls per entry rather than one fancy-indexed (P, P, k, k) gather:
    the backward of ``index_select`` is a small ``index_add`` into (..., P, n), whereas
    slicing a gathered (P, P, k, k) tensor costs a full-size zero fill per slice.
    """
    subsets = subset_index(u.shape[-1], k, u.device)
    rows = [u.index_select(-2, subsets[:, a]) for a in range(k)]
    return [[rows[a].index_select(-1, subsets[:, b]) for b in range(k)] for a in range(k)]


def submatrices(u: torch.Tensor, k: int) -> torch.Tensor:
    """Every k x k submatrix ``u[..., I, J]``: shape (..., C(n,k), C(n,k), k, k) (for tests)."""
    subsets = subset_index(u.shape[-1], k, u.device)
    return u[..., subsets[:, None, :, None], subsets[None, :, None, :]]


@lru_cache(maxsize=64)
def _laplace_index_cpu(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For 3-subsets T = (t0, t1, t2): t0, and the 2-subset index of T without t_b, b = 0..2."""
    triples = _subsets_cpu(n, 3)
    # Position of the 2-subset (i, j), i < j, in lexicographic order, via a dense lookup table.
    pairs = _subsets_cpu(n, 2)
    lookup = torch.full((n, n), -1, dtype=torch.long)
    lookup[pairs[:, 0], pairs[:, 1]] = torch.arange(pairs.shape[0])
    drop = torch.stack(
        [lookup[triples[:, 1], triples[:, 2]],
         lookup[triples[:, 0], triples[:, 2]],
         lookup[triples[:, 0], triples[:, 1]]],
        dim=1,
    )
    return triples[:, 0].contiguous(), drop, triples


_LAPLACE_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _laplace_index(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (n, str(device))
    cached = _LAPLACE_CACHE.get(key)
    if cached is None:
        cached = tuple(t.to(device) for t in _laplace_index_cpu(n))  # type: ignore[assignment]
        _LAPLACE_CACHE[key] = cached
    return cached


def _det2(g: list[list[torch.Tensor]]) -> torch.Tensor:
    return g[0][0] * g[1][1] - g[0][1] * g[1][0]


def _det3(u: torch.Tensor, minors2: torch.Tensor) -> torch.Tensor:
    """All 3x3 minors by Laplace expansion along the first row, reusing the 2x2 minors.

    det U[I, J] = sum_b (-1)^b U[i0, j_b] * det U[{i1,i2}, J without j_b]: six gathers of
    (P3, P3) and three products, instead of eighteen products on nine gathered entries.
    """
    first, drop, triples = _laplace_index(u.shape[-1], u.device)
    rows_u = u.index_select(-2, first)
    rows_m = minors2.index_select(-2, drop[:, 0])
    terms = [rows_u.index_select(-1, triples[:, b]) * rows_m.index_select(-1, drop[:, b])
             for b in range(3)]
    return terms[0] - terms[1] + terms[2]


def _reduce(g: list[list[torch.Tensor]], reduction: Reduction) -> torch.Tensor:
    flat = [entry for row in g for entry in row]
    if reduction == "max":
        return torch.stack(flat, dim=-1).amax(dim=-1)
    if reduction == "avg":
        return torch.stack(flat, dim=-1).mean(dim=-1)
    raise ValueError(f"unknown reduction {reduction!r}")


_ANCHORS: dict[tuple[int, int, str, str, torch.dtype], torch.Tensor] = {}


def _anchor(n: int, k: int, reduction: Reduction, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """identity - reduction(identity): added to the max/avg ablations so that U = I gives I."""
    key = (n, k, reduction, str(device), dtype)
    cached = _ANCHORS.get(key)
    if cached is None:
        eye = torch.eye(n, dtype=dtype, device=device)
        reduced = _reduce(_entries(eye, k), reduction)
        cached = torch.eye(reduced.shape[-1], dtype=dtype, device=device) - reduced
        _ANCHORS[key] = cached
    return cached


def compound_matrix(u: torch.Tensor, k: int, reduction: Reduction = "det",
                    minors2: torch.Tensor | None = None) -> torch.Tensor:
    """C_k(u) for a batch of square matrices u (..., n, n) -> (..., C(n,k), C(n,k)).

    ``minors2`` may pass an already computed ``compound_matrix(u, 2)`` to save work for k = 3.
    """
    n = u.shape[-1]
    if k < 1 or k > n:
        raise ValueError(f"compound order {k} needs 1 <= k <= n = {n}")
    if k == 1:
        return u
    if k > 3:
        raise ValueError("compound orders above 3 are not supported")
    if reduction == "det":
        if k == 2:
            return _det2(_entries(u, 2))
        if minors2 is None:
            minors2 = _det2(_entries(u, 2))
        return _det3(u, minors2)
    return _reduce(_entries(u, k), reduction) + _anchor(n, k, reduction, u.device, u.dtype)


def skew_from_vector(vec: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n(n-1)/2) strictly-upper-triangle values -> (..., n, n) skew-symmetric matrices."""
    rows, cols = triu_index(n, vec.device)
    upper = vec.new_zeros(*vec.shape[:-1], n, n)
    upper[..., rows, cols] = vec
    return upper - upper.transpose(-2, -1)


_TRIU_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def triu_index(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the strict upper triangle (PEFT's OFT storage order)."""
    key = (n, str(device))
    cached = _TRIU_CACHE.get(key)
    if cached is None:
        rows, cols = torch.triu_indices(n, n, offset=1, device=device)
        cached = (rows, cols)
        _TRIU_CACHE[key] = cached
    return cached


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - S)(I + S)^-1`` for skew-symmetric S (..., n, n); exact, no series."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def inverse_cayley(rotation: torch.Tensor) -> torch.Tensor:
    """S with ``cayley(S) == rotation``: ``(I + R)^-1 (I - R)``; singular at eigenvalue -1."""
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    eye = eye.expand_as(rotation)
    return torch.linalg.solve(eye + rotation, eye - rotation)


@dataclass(frozen=True)
class BlockLayout:
    """How one module's input width is cut into blocks and each block into compound segments.

    A block of size ``block_size`` holds, from its first coordinate on, C_k(U) for each order
    k in ``orders`` (ascending) and then identity padding.
    """

    in_features: int
    blocks: int
    block_size: int
    n: int
    orders: tuple[int, ...]

    @property
    def segment_sizes(self) -> tuple[int, ...]:
        return tuple(comb(self.n, k) for k in self.orders)

    @property
    def active_size(self) -> int:
        """Coordinates per block moved by the adapter (the rest is identity padding)."""
        return sum(self.segment_sizes)

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(order, start, size) of every compound segment inside a block."""
        out, start = [], 0
        for k, size in zip(self.orders, self.segment_sizes, strict=True):
            out.append((k, start, size))
            start += size
        return tuple(out)


def largest_n(block_size: int, orders: tuple[int, ...]) -> int:
    """The largest n with sum_k C(n, k) <= block_size (0 if even n = 1 does not fit)."""
    n = 0
    while sum(comb(n + 1, k) for k in orders) <= block_size:
        n += 1
    return n


def plan_layout(in_features: int, blocks: int, orders: tuple[int, ...]) -> BlockLayout:
    """Block size = in_features / blocks; n = largest that fits. Raises ValueError otherwise."""
    if blocks < 1 or in_features % blocks != 0:
        raise ValueError(f"{blocks} blocks do not divide the input width {in_features}")
    block_size = in_features // blocks
    n = largest_n(block_size, orders)
    # n >= 2 so U has at least one rotation angle; n >= max order so every C_k is non-empty.
    if n < max(2, max(orders)):
        raise ValueError(
            f"block size {block_size} is too small for orders {list(orders)} "
            f"(needs at least {sum(comb(max(2, max(orders)), k) for k in orders)})"
        )
    return BlockLayout(in_features, blocks, block_size, n, tuple(orders))
