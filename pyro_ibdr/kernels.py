"""Stein kernels for ``pyro.infer.SVGD`` beyond Pyro's per-dimension ones."""

from __future__ import annotations

import math

import torch
from pyro.infer.svgd import RBFSteinKernel, SteinKernel


class ScalarRBFKernel(SteinKernel):
    r"""The RBF kernel with one bandwidth for all dimensions, for ``SVGD(..., mode="multivariate")``.

        k(x, y) = exp(−||x − y||² / h),    h = f · median_{n<m} ||x_n − x_m||² / log(K + 1),

    the median heuristic of Liu & Wang (2016): the median pair of particles has k = 1/(K + 1) whatever D is.
    Pyro's :class:`~pyro.infer.RBFSteinKernel` picks one bandwidth *per dimension*; summed over D ≳ 10
    dimensions its joint kernel underflows to 0 and SVGD degenerates to independent MAP fits.

    Returned per dimension, as ``SVGD`` expects: ``log_kernel[n, m, d] = −(x_md − x_nd)² / h`` (summing over
    d gives log k(x_n, x_m)) and ``grad[n, m, d] = 2 (x_md − x_nd) / h``, i.e. −∂ log k(x_n, x_m)/∂x_md,
    the sign Pyro's SVGD adds to the descent direction (the repulsive term).

    :param bandwidth_factor: f > 0, scales the median heuristic.
    """

    def __init__(self, bandwidth_factor: float = 1.0) -> None:
        if not bandwidth_factor > 0:
            raise ValueError(f"bandwidth_factor must be positive, got {bandwidth_factor}")
        self.bandwidth_factor = float(bandwidth_factor)
        self.last_bandwidth: float | None = None

    @staticmethod
    def _check(particles: torch.Tensor) -> None:
        if particles.dim() != 2 or particles.shape[0] < 2:
            raise ValueError(f"particles must have shape (K, D) with K >= 2, got {tuple(particles.shape)}")

    def bandwidth(self, particles: torch.Tensor) -> torch.Tensor:
        """h (a scalar tensor) from particles (K, D); floored at machine epsilon for coincident particles."""
        self._check(particles)
        num = particles.shape[0]
        sq_dist = torch.cdist(particles, particles).pow(2)
        upper = torch.triu_indices(num, num, offset=1, device=particles.device)
        median = sq_dist[upper[0], upper[1]].median()
        h = self.bandwidth_factor * median / math.log(num + 1)
        return h.clamp_min(torch.finfo(particles.dtype).eps)

    @torch.no_grad()
    def kernel_matrix(self, particles: torch.Tensor) -> torch.Tensor:
        """K × K matrix k(x_n, x_m)."""
        return torch.exp(-torch.cdist(particles, particles).pow(2) / self.bandwidth(particles))

    @torch.no_grad()
    def log_kernel_and_grad(self, particles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bandwidth(particles)
        self.last_bandwidth = float(h)
        delta = particles.unsqueeze(0) - particles.unsqueeze(1)  # [n, m] = x_m − x_n
        return -delta.pow(2) / h, 2.0 * delta / h


class FlooredRBFSteinKernel(RBFSteinKernel):
    """Pyro's per-dimension RBF kernel, h_d = median_{n<m} (x_nd − x_md)² / log(K + 1), floored at machine epsilon.

    Unfloored, a coordinate on which all particles agree gives 0/0 = NaN; at the LoRA initialisation every
    B entry (B = 0) and every shared head entry is such a coordinate.
    """

    def _bandwidth(self, norm_sq: torch.Tensor) -> torch.Tensor:
        return super()._bandwidth(norm_sq).clamp_min(torch.finfo(norm_sq.dtype).eps)
