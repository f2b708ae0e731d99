"""Solver table on sparse input (issue #22): truncpinv against ARPACK, PROPACK, PRIMME and a randomized SVD.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py --quick    # < 1 min: small matrices
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py --hidden   # the 20000 x 3000 case only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py            # every matrix, ranks 10/50/150
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py --matrix random --ranks 10 50   # a subset
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py --torch    # torch operator input: ours only
    git archive 7cc3dbf truncpinv | tar -x -C /tmp/base    # an older truncpinv, to time beside this one:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_table.py --hidden --baseline /tmp/base --stat median

Matrices: ``scipy.sparse.random`` (uniform entries), the same with power-law
column norms (column ``j`` scaled by ``(j + 1)^{-1/2}``), and the signed
edge-node incidence matrix of a random graph. For each matrix, rank and
tolerance ``t`` every method runs in the same process on one thread,
interleaved round by round (best of ``--repeats``, or their median with ``--stat median``):

* ``auto``: ``tp.pinv(A, rank=k, rtol=1e-8)`` at its default certified tolerance (``1e-12``);
* ``tp-svds``, ``tp-lanczos``, ``tp-irlba``: ``tp.ScipySVDS(tol=t)``, ``tp.Lanczos(tol=t)`` and ``tp.IRLBA(tol=t)``
  (``t = 0``, the ``--hidden`` case: every method at its defaults);
* ``arpack``, ``propack``: ``scipy.sparse.linalg.svds(A, k, tol=t, solver=...)``;
* ``sklearn-rsvd``: ``sklearn.utils.extmath.randomized_svd(A, k)`` (no tolerance: its defaults);
* ``primme``: ``primme.svds(A, k, tol=t)`` when ``primme`` is importable (not a dependency);
* ``auto@base``: with ``--baseline DIR``, ``auto`` of the ``truncpinv`` package in ``DIR`` (for instance an
  older revision exported by ``git archive``), loaded beside this one in the same process, so that a change
  is timed against its baseline in one run.

With ``--torch`` (or ``--torch operator``) the matrices reach truncpinv as torch operators
(:class:`truncpinv.CallableOperator` over ``torch.sparse_csr_tensor`` copies of
``A`` and ``A^T``, float64: every product runs in torch); with ``--torch sparse`` as a
:class:`truncpinv.TensorOperator` over the ``torch.sparse_csr_tensor`` of ``A`` (which
``tp.ScipySVDS`` hands to SciPy's kernels without a copy). Only ``auto``, ``tp-svds``,
``tp-lanczos`` and ``tp-irlba`` run (SciPy's own solvers take no torch input); the
``/ arpack`` column then holds the ratio to ``tp-svds``.

Columns: time and its ratios to ``arpack`` and to ``tp-lanczos`` in the same run, products (columns
multiplied by ``A`` or ``A^T``, counted in an untimed first round for the
peers), the largest relative error of the kept values against a dense float64
reference (the SVD of ``A.toarray()``, or for more than ``6e7`` entries the
eigenvalues of the float64 Gram matrix, accurate to ``eps (sigma_1 / sigma_k)^2``),
and whether the triplets pass truncpinv's certificate at residual tolerance
``t`` (the peers' answers are certified after the fact, untimed).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import truncpinv as tp

#: The cut-off of every truncpinv call (the hidden case's ``rtol``); far below the kept values here.
RTOL = 1e-8
Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]


def random_sparse(m: int, n: int, density: float, seed: int = 0) -> sp.csr_matrix:
    """``scipy.sparse.random`` with uniform ``[0, 1)`` entries (the issue's matrix)."""
    return sp.random(m, n, density=density, random_state=seed, format="csr")


def power_law(m: int, n: int, density: float, seed: int = 1) -> sp.csr_matrix:
    """Random sparse with column ``j`` scaled by ``(j + 1)^{-1/2}`` (power-law column norms)."""
    A = sp.random(
        m, n, density=density, random_state=seed, format="csc", data_rvs=np.random.default_rng(seed).standard_normal
    )
    return (A @ sp.diags(1.0 / np.sqrt(np.arange(1, n + 1)))).tocsr()


def incidence(nodes: int, edges: int, seed: int = 2) -> sp.csr_matrix:
    """Signed edge-node incidence matrix (``edges x nodes``, ``+1``/``-1`` per row) of a random multigraph."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, nodes, edges)
    j = (i + rng.integers(1, nodes, edges)) % nodes  # no self loops
    rows = np.repeat(np.arange(edges), 2)
    cols = np.stack([i, j], 1).ravel()
    vals = np.tile([1.0, -1.0], edges)
    return sp.csr_matrix((vals, (rows, cols)), shape=(edges, nodes))


def _csr(M: sp.csr_matrix) -> torch.Tensor:
    M = M.tocsr().astype(np.float64)
    t = (torch.from_numpy(M.indptr.astype(np.int64)), torch.from_numpy(M.indices.astype(np.int64)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(*t, torch.from_numpy(M.data), M.shape)


def torch_operator(A: sp.csr_matrix) -> tp.CallableOperator:
    """``A`` as a float64 torch operator: sparse CSR products with ``A`` and with a CSR copy of ``A^T``."""
    At, AtT = _csr(A), _csr(A.T)
    return tp.CallableOperator(A.shape, lambda X: At @ X, lambda Y: AtT @ Y, dtype=torch.float64)


def torch_sparse(A: sp.csr_matrix) -> tp.TensorOperator:
    """``A`` as a float64 ``torch.sparse_csr_tensor`` in a :class:`truncpinv.TensorOperator`."""
    return tp.TensorOperator(_csr(A))


def reference(A: sp.csr_matrix) -> tuple[np.ndarray, str]:
    """Singular values of ``A``, descending, from a dense float64 computation."""
    if A.shape[0] * A.shape[1] <= 6e7:
        return np.linalg.svd(A.toarray(), compute_uv=False), "dense SVD"
    G = (A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T).toarray()
    lam = np.linalg.eigvalsh(G)[::-1]
    return np.sqrt(np.maximum(lam, 0.0)), "dense Gram eigvalsh"


class Counted(spla.LinearOperator):  # type: ignore[misc]
    """``A`` as a SciPy operator that counts the columns it multiplies."""

    def __init__(self, A: Any) -> None:
        super().__init__(A.dtype, A.shape)
        self.A, self.columns = A, 0

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self.columns += X.shape[1]
        return np.asarray(self.A @ X)

    def _rmatmat(self, Y: np.ndarray) -> np.ndarray:
        self.columns += Y.shape[1]
        return np.asarray(self.A.T @ Y)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.columns += 1
        return np.asarray(self.A @ x)

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        self.columns += 1
        return np.asarray(self.A.T @ y)


@dataclass
class Result:
    time: float
    products: int
    err: float
    certified: bool | None


def _ours(solver: Callable[[float], tp.Solver]) -> Callable[[Any, int, float], tuple[Triplet, int, bool]]:
    def run(A: Any, k: int, t: float) -> tuple[Triplet, int, bool]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tp.UncertifiedResultWarning)
            F = solver(t).factorize(A, rank=k, rtol=RTOL)
        cert = bool(F.stats.get("certified", True))
        return (np.asarray(F.U), np.asarray(F.S), np.asarray(F.V)), int(F.stats["matvecs"]), cert

    return run


def _svds(solver: str) -> Callable[[Any, int, float], Triplet]:
    def run(A: Any, k: int, t: float) -> Triplet:
        U, S, Vh = spla.svds(
            A, k=k, tol=t, solver=solver, random_state=0, maxiter=None if solver == "arpack" else 20 * k + 200
        )
        return U, S, Vh.T

    return run


def _rsvd(A: Any, k: int, t: float) -> Triplet:
    from sklearn.utils.extmath import randomized_svd

    U, S, Vh = randomized_svd(A, k, random_state=0)
    return U, S, Vh.T


def _primme(A: Any, k: int, t: float) -> Triplet:
    import primme  # type: ignore[import-not-found]

    U, S, Vh = primme.svds(A, k, tol=t)
    return U, S, Vh.T


OURS: dict[str, Callable[[float], tp.Solver]] = {
    "auto": lambda t: tp.Auto(),
    "tp-svds": lambda t: tp.ScipySVDS(tol=t or None),
    "tp-lanczos": lambda t: tp.Lanczos(tol=t or None),
    "tp-irlba": lambda t: tp.IRLBA(tol=t or None),
}
PEERS: dict[str, Callable[[Any, int, float], Triplet]] = {
    "arpack": _svds("arpack"),
    "propack": _svds("propack"),
    "sklearn-rsvd": _rsvd,
}
try:
    import primme  # type: ignore[import-not-found]  # noqa: F401

    PEERS["primme"] = _primme
except ImportError:
    pass


def _sorted(trip: Triplet) -> Triplet:
    U, S, V = trip
    o = np.argsort(-S)
    return U[:, o], S[o], V[:, o]


def load_baseline(root: str) -> Any:
    """The ``truncpinv`` package under ``root``, imported beside the one already loaded (``tp``).

    Its modules are imported eagerly by its ``__init__`` (truncpinv imports nothing lazily), bound to
    each other by their own globals; they are then removed from ``sys.modules``, so that the names
    ``truncpinv.*`` go on meaning this checkout's package.
    """
    saved = {k: v for k, v in sys.modules.items() if k == "truncpinv" or k.startswith("truncpinv.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        import truncpinv as base
    finally:
        sys.path.pop(0)
        for k in [k for k in sys.modules if k == "truncpinv" or k.startswith("truncpinv.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    if Path(base.__file__).resolve() == Path(tp.__file__).resolve():
        raise ValueError(f"`--baseline` {root!r} holds no truncpinv package of its own")
    return base


def _certify(A: Any, trip: Triplet, k: int, t: float) -> bool:
    U, S, V = (torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)) for X in trip)
    tol = tp.Tolerance(rank=k, rtol=RTOL, atol=0.0)
    t = t or tp.default_tol(torch.float64, A.shape)
    return tp.certify(tp.aslinearoperator(A), U, S, V, tol, rtol_res=t, runs=1, max_steps=400).certified


def measure(
    A: Any,
    s_ref: np.ndarray,
    k: int,
    t: float,
    repeats: int,
    torch_input: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    stat: Callable[[list[float]], float] = min,
    baseline: Any = None,
) -> dict[str, Result]:
    """Every method on ``A`` at rank ``k`` and tolerance ``t``, interleaved round by round; each time is
    ``stat`` (``min`` or ``statistics.median``) of its rounds.

    ``torch_input``: ``A`` is a torch operator; no SciPy peers. ``baseline``: a second ``truncpinv``
    package (:func:`load_baseline`) whose ``auto`` runs as ``auto@base``.
    """
    PEERS_ = {} if torch_input else PEERS
    ours = dict(OURS)
    if baseline is not None:
        ours["auto@base"] = lambda t: baseline.Auto()
    names = list(ours) + list(PEERS_)
    times: dict[str, list[float]] = {name: [] for name in names}
    out: dict[str, Any] = {}
    products: dict[str, int] = {}
    certified: dict[str, bool | None] = {}
    for name, fn in PEERS_.items():  # untimed round: products and certificate of the peers
        C = Counted(A)
        try:  # randomized_svd needs the matrix itself: its products are not counted
            out[name] = _sorted(fn(A, k, t) if name == "sklearn-rsvd" else fn(C, k, t))
            products[name] = C.columns
            certified[name] = _certify(A, out[name], k, t)
        except Exception as e:  # a peer that fails is reported, not fatal
            print(f"  {name}: failed ({type(e).__name__}: {e})", file=sys.stderr)
            out[name], products[name], certified[name] = None, 0, None
    for _ in range(repeats):
        for name in names:
            if name in PEERS_ and out[name] is None:
                continue
            t0 = clock()
            if name in ours:
                trip, products[name], certified[name] = _ours(ours[name])(A, k, t)
            else:
                trip = PEERS_[name](A, k, t)
            times[name].append(clock() - t0)
            out[name] = _sorted(trip)
    res = {}
    for name in names:
        if out[name] is None:
            continue
        S = out[name][1][:k]
        err = float(np.max(np.abs(S - s_ref[: S.size]) / s_ref[: S.size]))
        res[name] = Result(stat(times[name]), products[name], err, certified[name])
    return res


def table(title: str, res: dict[str, Result]) -> str:
    base = res["arpack"].time if "arpack" in res else res["tp-svds"].time
    old = res["tp-lanczos"].time if "tp-lanczos" in res else math.nan
    lines = [
        f"**{title}**",
        "",
        "| method | time [s] | / arpack | / tp-lanczos | products | max rel. error | certified |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res.items():
        cert = "" if r.certified is None else ("yes" if r.certified else "no")
        prods = str(r.products) if r.products else "n/a"
        lines.append(
            f"| {name} | {r.time:.3f} | {r.time / base:.2f} | {r.time / old:.2f} | {prods} | {r.err:.1e} | {cert} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small matrices, ranks 10 and 50 (under a minute)")
    p.add_argument("--hidden", action="store_true", help="only the issue's 20000 x 3000 case, rank 50, t = 1e-8")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 1 quick, 3 otherwise)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time (default) or this process's CPU time (time.process_time: steadier on a shared "
        "machine; one thread, so the two agree on an idle one)",
    )
    p.add_argument(
        "--stat", choices=["best", "median"], default="best", help="time of a method: best (default) or median"
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="also time `auto` of the truncpinv package in DIR (e.g. an older revision from git archive) as "
        "auto@base, in the same process",
    )
    p.add_argument("--matrix", default=None, help="only the matrices whose title starts with this (e.g. 'random')")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="only these ranks")
    p.add_argument(
        "--torch",
        nargs="?",
        const="operator",
        choices=["operator", "sparse"],
        help="torch input: a CallableOperator over torch CSR products (default) or a TensorOperator over a "
        "torch CSR tensor; only auto, tp-svds, tp-lanczos, tp-irlba",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    repeats = args.repeats or (1 if args.quick else 3)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    stat = min if args.stat == "best" else statistics.median
    baseline = None if args.baseline is None else load_baseline(args.baseline)
    print(
        f"truncpinv {tp.__version__}, torch {torch.__version__}, 1 thread, {args.stat} of {repeats}, "
        f"{args.clock} time" + ("" if baseline is None else f", auto@base from {args.baseline}"),
        flush=True,
    )
    if args.hidden:
        # t = 0: every method at its defaults (svds: machine precision; truncpinv: tp.default_tol)
        cases = [("random 20000x3000 d=0.01 (hidden case)", random_sparse(20_000, 3_000, 0.01), [50], [0.0])]
    elif args.quick:
        cases = [
            ("random 3000x500 d=0.02", random_sparse(3_000, 500, 0.02), [10, 50], [1e-6, 1e-10]),
            ("power-law 3000x600 d=0.01", power_law(3_000, 600, 0.01), [10, 50], [1e-6, 1e-10]),
            ("incidence 2400 edges x 400 nodes", incidence(400, 2_400), [10, 50], [1e-6, 1e-10]),
        ]
    else:
        cases = [
            ("random 20000x3000 d=0.01", random_sparse(20_000, 3_000, 0.01), [10, 50, 150], [1e-6, 1e-10]),
            ("power-law 30000x5000 d=0.002", power_law(30_000, 5_000, 0.002), [10, 50, 150], [1e-6, 1e-10]),
            ("incidence 30000 edges x 5000 nodes", incidence(5_000, 30_000), [10, 50, 150], [1e-6, 1e-10]),
        ]
    cases = [(t, A, args.ranks or r, tols) for t, A, r, tols in cases if t.startswith(args.matrix or "")]
    for title, A, ranks, tols in cases:
        s_ref, how = reference(A)
        for k in ranks:
            for t in tols:
                print(f"{title}, rank {k}, t={t:g} ...", file=sys.stderr, flush=True)
                wrap = {"operator": torch_operator, "sparse": torch_sparse}.get(args.torch)
                res = measure(
                    A if wrap is None else wrap(A), s_ref, k, t, repeats, wrap is not None, clock, stat, baseline
                )
                print(table(f"{title}, rank {k}, tol {t:g} (reference: {how})", res), flush=True)


if __name__ == "__main__":
    main()
