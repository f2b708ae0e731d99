r"""The float64 products of the Gram route's factors: ``X X^T`` (:func:`gram64`) and how the per-sample and per-row
Gram matrices of a layer combine (:func:`expand_rows`, :func:`rows_times_samples`).

:mod:`sven.linearize.gram_factors` builds each block of ``K = J J^T`` from these; the maths of the blocks is in
the docstring of :mod:`sven.linearize.gram`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..functional import host

__all__ = ["CHUNK", "expand_rows", "gram64", "host_gram64", "host_view", "rows_times_samples"]

#: Columns converted to float64 at a time when the Gram matrix of formed per-row gradients is accumulated.
CHUNK = 2048


def gram64(M: torch.Tensor) -> torch.Tensor:
    """``M M^T`` in float64 for ``(N, q)`` ``M``, converting at most :data:`CHUNK` columns at a time.

    On the CPU the product is NumPy's, on a view of ``M``: NumPy computes ``X X^T`` by the symmetric
    rank-k update (BLAS ``dsyrk``), half the multiplications of the general product that torch calls,
    and the result is exactly symmetric. The same sums in another order: equal to round-off
    (``tests/test_gram_fast.py``). Other devices, and tensors without storage of their own (inside
    :mod:`torch.func` transforms), keep torch's product.

    Only while torch runs on one intra-op thread: NumPy's BLAS has its own thread pool
    (``OMP_NUM_THREADS``, ``threadpoolctl``), which ``torch.set_num_threads`` does not set, and its
    threads wait spinning after a call. Beside torch's own threads on the same cores that made a
    product-heavy loop 1.4-1.7x slower (2 cores, both pools at 2 threads); with torch on one thread the
    NumPy path was 0.72-0.76x the torch path's time. So with more torch threads the product is torch's.
    """
    x = host_view(M)
    if x is not None:
        return torch.from_numpy(host_gram64(x))
    if M.dtype == torch.float64:
        return M @ M.T
    K = torch.zeros(M.shape[0], M.shape[0], dtype=torch.float64, device=M.device)
    for j in range(0, M.shape[1], CHUNK):
        Mc = M[:, j : j + CHUNK].double()
        K += Mc @ Mc.T
        del Mc  # one converted chunk alive at a time
    return K


def host_gram64(x: np.ndarray) -> np.ndarray:
    """``x x^T`` in float64 by NumPy's ``dsyrk``, at most :data:`CHUNK` columns converted at a time."""
    if x.dtype == np.float64 or x.shape[1] <= CHUNK:  # (one chunk: its product is K, no sum)
        xc = np.ascontiguousarray(x, dtype=np.float64)
        return xc @ xc.T  # type: ignore[no-any-return]
    K = np.zeros((x.shape[0], x.shape[0]))
    for j in range(0, x.shape[1], CHUNK):
        xc = np.ascontiguousarray(x[:, j : j + CHUNK], dtype=np.float64)
        K += xc @ xc.T
        del xc  # one converted chunk alive at a time
    return K


def host_view(M: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a real float32/float64 CPU tensor ``M`` (detached, any size: :func:`sven.functional.host`)
    while torch runs on one thread (see :func:`gram64`), or ``None`` (torch's path)."""
    return host(M.detach(), limit=M.numel()) if torch.get_num_threads() == 1 else None


def expand_rows(K: torch.Tensor, D: int, dims: tuple[int, int]) -> torch.Tensor:
    """Repeat each sample's entries ``D`` times along ``dims`` (sample -> its ``D`` rows), in one copy."""
    if D == 1:
        return K
    i, j = dims
    shape = list(K.shape)
    E = K.unsqueeze(j + 1).unsqueeze(i + 1)  # (..., B, 1, ..., B, 1, ...): a new axis after each sample axis
    sizes = list(E.shape)
    sizes[i + 1], sizes[j + 2] = D, D
    shape[i], shape[j] = shape[i] * D, shape[j] * D
    return E.expand(sizes).reshape(shape)


def rows_times_samples(Kg: torch.Tensor, Ka: torch.Tensor, D: int) -> torch.Tensor:
    r""":math:`K_{nm} = K^g_{nm}\, K^a_{b(n) b(m)}` for the ``(B D, B D)`` Gram matrix ``Kg`` of the rows and the
    ``(B, B)`` one ``Ka`` of the samples (row ``n`` of sample :math:`b(n) = \lfloor n / D \rfloor`): a layer's block
    of ``K`` without extra dimensions, :math:`(A A^\top) \circ (G G^\top)`.

    Written into ``Kg`` (a product just formed, float64). On the CPU the product is NumPy's, with ``Ka``'s rows
    repeated (``(B, B D)``, each entry ``D`` times): torch's broadcast of ``Ka[:, None, :, None]`` over
    ``(B, D, B, D)`` runs an inner loop of ``D`` entries, 1.5-2x slower at ``D = 2``. The same products.
    """
    N = Kg.shape[0]
    B = N // D
    kg, ka = host(Kg, limit=Kg.numel()), host(Ka, limit=Ka.numel())
    if kg is not None and ka is not None and kg.flags.c_contiguous and kg.flags.writeable:
        rows = kg.reshape(B, D, N)
        with np.errstate(all="ignore"):  # (an overflow is NaN or Inf in K, as torch's: the step reports it)
            np.multiply(rows, (np.repeat(ka, D, axis=1) if D > 1 else ka)[:, None, :], out=rows)
        return Kg
    return (Kg.reshape(B, D, B, D) * Ka[:, None, :, None]).reshape(N, N)
