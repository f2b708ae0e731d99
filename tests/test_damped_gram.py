r"""The Cholesky directions of the Gram route (:mod:`sven.damped_gram`) against the exact eigendecomposition.

Every tolerance comes from round-off: a direction certified by :class:`~sven.damped_gram.DampedGram` differs
from the exact path's step in exact arithmetic (the kept eigenpairs of ``K``, filtered, here in float64) by at
most ``accuracy(m) * ||d||`` (the bound it checks), and its float32 product with ``M^T`` adds at most
``m eps32 ||M||_F ||y||`` (a dot product of length ``m`` per entry), where ``y`` solves ``(K + lambda I) y = R``.
The exact path's own float32 re-filtering (``F.solve(U @ coeff)``) divides the round-off of ``U^T U coeff``
by :math:`\sigma_i^2`: on a spectrum of condition ``4e3`` it is ``1e-4`` off, the Cholesky direction ``1e-7``;
so the reference is the float64 filtered step, and the float32 one is compared at its own accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sven
import sven.damped_gram as DG
import truncpinv
from sven import functional as SF
from sven.factored_model import model_change
from sven.factorize import factorize
from sven.info import StepFault

from .spectra import KINDS, make_matrix

F32, F64 = torch.float32, torch.float64
EPS32 = float(torch.finfo(F32).eps)


class GramOperator:
    """A float32 ``M`` as the Gram route hands it over: ``gram`` (float64 ``M M^T``), ``rmatmat`` and ``matmat``."""

    def __init__(self, M: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        self.M = M
        self.gram = M.double() @ M.double().T if gram is None else gram
        self.shape, self.dtype, self.device = tuple(M.shape), M.dtype, M.device

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.M @ X

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.M.T @ Y


def _problem(m: int, n: int, kind: str, seed: int) -> tuple[GramOperator, torch.Tensor]:
    A, *_ = make_matrix(m, n, kind, seed)
    R = np.random.default_rng(seed + 1).standard_normal(m)
    return GramOperator(torch.from_numpy(A).to(F32)), torch.from_numpy(R).to(F32)


def _rtol(op: GramOperator) -> float:
    """The numerically-zero cut-off that :func:`sven.factorize.factorize` resolves ``rtol=None`` to."""
    return truncpinv.default_rtol(op.shape, op.dtype)


def _exact(op: GramOperator, rtol: float | None = None) -> truncpinv.TruncatedPinv:
    """The exact path: what :func:`sven.factorize.factorize` computed before (the full eigendecomposition)."""
    rtol = rtol or _rtol(op)
    return truncpinv.pinv_from_gram(op.gram, op, rtol=rtol, atol=0.0, check_finite=False, solver=truncpinv.Auto())


def _reference(op: GramOperator, R: torch.Tensor, damping: float, rank: int) -> torch.Tensor:
    r"""The exact path's step in float64: :math:`M^\top U_r (\Lambda_r + \lambda)^{-1} U_r^\top R`."""
    lam, Q = torch.linalg.eigh(op.gram)
    lam, Q = lam.flip(0)[:rank], Q.flip(1)[:, :rank]
    coeff = (Q.T @ R.double()) / (lam + damping * float(lam[0]))
    return op.M.double().T @ (Q @ coeff)


def _tolerance(op: GramOperator, R: torch.Tensor, damping: float) -> float:
    """The bound of the module docstring for ``||d_cholesky - d_reference||``."""
    K = op.gram
    lam = damping * float(torch.linalg.eigvalsh(K)[-1])
    y = torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=F64), R.double())
    d = math.sqrt(float(y @ (K @ y)))
    m = op.shape[0]
    return DG.accuracy(m, F32) * d + 2 * m * EPS32 * float(op.M.double().norm()) * float(y.norm())


def _damped(op: GramOperator, rtol: float | None = None) -> DG.DampedGram | None:
    return DG.factorize_damped(op, truncpinv.Auto(), rank=None, rtol=rtol or _rtol(op), atol=0.0)


def _untruncated(op: GramOperator) -> DG.DampedGram | None:
    return DG.factorize_damped(op, truncpinv.Auto(), rank=None, rtol=_rtol(op), atol=0.0, untruncated=True)


@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from([(24, 60), (40, 16), (32, 32)]),
    dampings=st.lists(st.sampled_from([1e-3, 1e-2, 0.1, 0.3, 1.0, 4.0]), min_size=1, max_size=3),
    rtol=st.sampled_from([None, 3e-3]),
    seed=st.integers(0, 2**16),
)
def test_certified_direction_is_the_exact_one(
    kind: str, shape: tuple[int, int], dampings: list[float], rtol: float | None, seed: int
):
    """Each certified direction (retries at other dampings on one factorisation included) is the exact path's,
    with the default cut-off (the dropped values are round-off) and with ``rtol=3e-3``, which drops values far
    above round-off on the ``gap`` and ``geometric`` spectra (deflated)."""
    op, R = _problem(*shape, kind, seed)
    D, F = _damped(op, rtol), _exact(op, rtol)
    if D is None:  # declined (a value at the cut-off, or more than BAND_MAX dropped above round-off)
        return
    for damping in dampings:
        d = D.damped_direction(R, damping)
        if d is None:
            continue
        ref = _reference(op, R, damping, F.rank)
        assert float((d.double() - ref).norm()) <= _tolerance(op, R, damping)
        # the exact path's float32 direction, at its own accuracy (module docstring)
        de = SF.filtered_direction(F, R, damping=damping).double()
        kappa2 = float(F.S[0] / F.S[-1]) ** 2
        own = 4 * shape[0] * EPS32 * kappa2 * float(ref.norm())
        assert float((de - ref).norm()) <= _tolerance(op, R, damping) + own
        # the model change of the very direction (the control's prediction) is K y = M d
        change = model_change(D, R, damping=damping).double()
        direct = op.M.double() @ d.double()
        slack = 2 * shape[0] * EPS32 * float(op.M.double().norm()) * float(d.double().norm()) + 1e-12
        assert float((change - direct).norm()) <= slack * max(1.0, float(op.M.double().norm()))


@pytest.mark.parametrize("kind", ["flat", "gap", "deficient"])
@pytest.mark.parametrize("shape", [(24, 60), (40, 16)])
def test_cholesky_path_is_taken(kind: str, shape: tuple[int, int]):
    """Not vacuous: on these spectra (kept values well above the cut-off, the rest round-off) every damping of the
    step control is certified, so the property test above compares the two paths."""
    op, R = _problem(*shape, kind, 3)
    D = _damped(op)
    assert D is not None
    for damping in (0.1, 0.2, 0.8):
        assert D.damped_direction(R, damping) is not None


def test_spectrum_rank_cutoff_and_angle_are_the_exact_paths():
    """``opt.last_step`` reads ``singular_values``, ``rank``, ``cutoff`` and the stationarity angle: the same values
    (the eigenvalues alone are the full decomposition's to round-off; the angle is ``||M^T R|| / (s1 ||R||)``)."""
    op, R = _problem(40, 90, "gap", 5)
    D, F = _damped(op), _exact(op)
    assert D is not None
    assert (D.rank, D.cutoff) == (F.rank, F.cutoff)
    s, se = D.singular_values.double(), F.singular_values.double()
    assert float((s - se).abs().max()) <= 4 * EPS32 * float(se[0])
    cos = float(SF.gradient_cosine(D, R))
    direct = float((op.M.double().T @ R.double()).norm()) / (float(se[0]) * float(R.double().norm()))
    assert cos == pytest.approx(direct, rel=100 * EPS32)


def test_factors_are_formed_on_demand_and_then_used():
    """Reading the factors forms the exact decomposition: ``F @ b`` is the exact path's, and so is every later
    direction."""
    op, R = _problem(24, 60, "flat", 7)
    D, F = _damped(op), _exact(op)
    assert D is not None and D.damped_direction(R, 0.1) is not None
    x, xe = D @ R, F @ R
    assert float((x - xe).norm()) <= 10 * 24 * EPS32 * float(xe.norm())
    assert D.damped_direction(R, 0.1) is None  # the eigenvectors exist now: the exact path's own directions
    assert D.stats["method"] == "eigh"


def test_a_residual_on_a_value_below_the_cutoff_is_deflated(monkeypatch: pytest.MonkeyPatch):
    """A singular value below the cut-off but far above round-off, with the residual on it: the plain Cholesky
    step would keep it (a direction of size ~``1/lambda``); its eigenvector is deflated, and the direction is the
    exact path's (zero: nothing of ``R`` is kept). Without deflation the factorisation declines."""
    gen = np.random.default_rng(0)
    m, n = 20, 50
    U, _ = np.linalg.qr(gen.standard_normal((m, m)))
    V, _ = np.linalg.qr(gen.standard_normal((n, m)))
    s = np.ones(m)
    s[-1] = 1e-3
    op = GramOperator(torch.from_numpy((U * s) @ V.T).to(F32))
    R = torch.from_numpy(U[:, -1] + 1e-3 * U[:, 0]).to(F32)
    D = _damped(op, 1e-2)
    assert D is not None and D.rank == m - 1
    d = D.damped_direction(R, 0.1)
    assert d is not None
    ref = _reference(op, R, 0.1, m - 1)
    assert float((d.double() - ref).norm()) <= _tolerance(op, R, 0.1)
    plain = op.M.double().T @ torch.linalg.solve(op.gram + 0.1 * torch.eye(m, dtype=F64), R.double())
    assert float((plain - ref).norm()) > 10 * float(ref.norm())  # (what deflation removes)
    monkeypatch.setattr(DG, "BAND_MAX", 0)
    assert _damped(op, 1e-2) is None
    F = factorize(op, truncpinv.Auto(), rank=None, rtol=1e-2, atol=0.0, floor=0.1)
    assert not isinstance(F, DG.DampedGram) and F.rank == m - 1


def test_cholesky_failure_falls_back_to_the_factors():
    """A ``K`` that is positive semi-definite only to round-off (an eigenvalue of ``-1e-15 lambda_1``) and a damping
    below it: the Cholesky factorisation fails and the direction comes from the exact factors."""
    op, R = _problem(24, 60, "deficient", 2)
    lam, Q = torch.linalg.eigh(op.gram)
    lam = lam.clone()
    lam[0] = -1e-15 * float(lam[-1])
    K = (Q * lam) @ Q.T
    bad = GramOperator(op.M, gram=(K + K.T) / 2)
    D = _damped(bad)
    assert D is not None
    assert D._solve(R, 1e-17)[0] is None
    assert D.damped_direction(R, 0.1) is not None  # a damping it resolves is served again


@pytest.mark.parametrize("what", ["nan", "inf", "indefinite"])
def test_bad_gram_matrix_is_reported_as_before(what: str):
    """NaN, Inf or a clearly indefinite ``K``: no Cholesky direction; the exact path reports it, as it did without
    a floor (:class:`sven.Sven` checks ``K`` for NaN and Inf before, and skips the step)."""
    op, _ = _problem(16, 30, "flat", 1)
    K = op.gram.clone()
    if what == "indefinite":
        K -= 0.5 * float(torch.linalg.eigvalsh(K)[-1]) * torch.eye(16, dtype=F64)
    else:
        K[3, 5] = K[5, 3] = float(what)
    bad = GramOperator(op.M, gram=K)
    assert _damped(bad) is None
    errors = []
    for floor in (None, 0.1):
        with pytest.raises((StepFault, ValueError)) as err:
            factorize(bad, truncpinv.Auto(), rank=None, rtol=None, atol=0.0, floor=floor)
        errors.append((err.type, str(err.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    "kwargs",
    [{"floor": None}, {"floor": 0.0}, {"floor": 1e-12}, {"floor": 0.1, "rank": 5}],
    ids=["no-floor", "undamped", "below-min", "rank-cap"],
)
def test_other_steps_keep_the_exact_path(kwargs: dict[str, Any]):
    """Undamped steps, a floor below :data:`~sven.damped_gram.MIN_DAMPING` and a rank cap keep the exact path."""
    op, _ = _problem(24, 60, "flat", 4)
    F = factorize(op, truncpinv.Auto(), rank=kwargs.get("rank"), rtol=None, atol=0.0, floor=kwargs["floor"])
    assert not isinstance(F, DG.DampedGram) and F.stats["method"] == "eigh"
    assert isinstance(factorize(op, truncpinv.Auto(), rank=None, rtol=None, atol=0.0, floor=0.1), DG.DampedGram)
    assert not isinstance(factorize(op.M, truncpinv.Auto(), rank=None, rtol=None, atol=0.0, floor=0.1), DG.DampedGram)


def _train(monkeypatch: pytest.MonkeyPatch, *, cholesky: bool, steps: int = 5) -> tuple[torch.Tensor, int, Any]:
    """A few steps of the loss rule on a small MLP classifier: the parameters and the Cholesky directions used."""
    monkeypatch.setattr(DG, "MIN_DAMPING", DG.MIN_DAMPING if cholesky else math.inf)
    used = [0]
    original = DG.DampedGram.damped_direction

    def counted(self: DG.DampedGram, R: torch.Tensor, damping: float) -> torch.Tensor | None:
        d = original(self, R, damping)
        used[0] += d is not None
        return d

    monkeypatch.setattr(DG.DampedGram, "damped_direction", counted)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = sven.Sven(net.parameters(), route="gram")  # (the route of the larger classifiers; this one would be autograd)
    for _ in range(steps):
        opt.step(lambda: torch.nn.functional.cross_entropy(net(x), y, reduction="none"))
    assert opt.config.ggn and opt.last_step is not None and opt.last_step.jacobian_method == "gram"
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), used[0], opt.last_step


def test_loss_rule_trajectory_is_unchanged(monkeypatch: pytest.MonkeyPatch):
    """Five steps of the loss rule with the Cholesky directions (nothing cut: :class:`~sven.damped_gram.Untruncated`)
    against the eigendecomposition's with ``rtol=0`` (which cuts ``K``'s round-off), and what ``last_step`` reports
    after them (the parameters differ by round-off, so its values to ``1e-3``).

    Each direction is the exact one to ``accuracy(64) = 64 eps32`` plus float32 products of the same size and the
    damped directions below the Gram route's zero floor (relative weight below ``sqrt(P eps64) / 0.03``, ``1e-5``);
    over five steps the relative difference of the parameters stays below ``1e-4``.
    """
    new, used, info = _train(monkeypatch, cholesky=True)
    old, unused, info_old = _train(monkeypatch, cholesky=False)
    assert used >= 3 and unused == 0
    assert float((new - old).norm()) <= 1e-4 * float(old.norm())
    # what last_step reports: sigma_max alone, every direction kept (no cut-off); the angle from every value
    s, s_old = info.singular_values.double(), info_old.singular_values.double()
    assert s.shape == (1,) and float((s[0] - s_old[0]).abs()) <= 1e-3 * float(s_old[0])
    assert info.rank == 64 > info_old.rank and info.cutoff == 0.0
    assert abs(info.gradient_cosine - info_old.gradient_cosine) <= 1e-3 + truncpinv.default_rtol((64, new.numel()), F32)


@pytest.mark.parametrize("cut", [True, False], ids=["cut", "nothing-cut"])
def test_a_residual_in_the_null_space_is_not_certified(cut: bool):
    """A tall ``M`` and a residual orthogonal to its columns' span: both directions are round-off (``M^T R = 0``),
    so no relative accuracy can be certified; the direction comes from the factors. A residual in the span is
    certified on the same factorisation (the bound depends on ``R``, not only on the spectrum). The same with
    nothing cut (:class:`~sven.damped_gram.Untruncated`)."""
    op, _ = _problem(40, 16, "flat", 6)
    Q = torch.linalg.qr(op.M.double(), mode="complete").Q
    D = _damped(op) if cut else _untruncated(op)
    assert D is not None
    assert D.damped_direction(Q[:, 16:].sum(dim=1).to(F32), 0.1) is None
    assert D.damped_direction(Q[:, :16].sum(dim=1).to(F32), 0.1) is not None


@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from([(1, 5), (2, 3), (24, 60), (40, 16), (33, 33)]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_tridiagonal_spectrum_and_band(kind: str, shape: tuple[int, int], seed: int, data: st.DataObject):
    """:class:`~sven.damped_gram.Tridiagonal`: its spectrum is ``eigvalsh``'s to the backward error
    ``m eps64 lambda_1``, and a band of ``count`` values from position ``first`` (descending) are those values
    with orthonormal eigenvectors (residual and orthonormality at round-off, and the same invariant subspace as
    ``eigh``'s where the band is separated from the rest)."""
    m = shape[0]
    K = torch.from_numpy(make_matrix(*shape, kind, seed)[0]).double()
    K = K @ K.T
    T = DG.Tridiagonal.of(K.numpy())
    assert T is not None
    lam, Q = torch.linalg.eigh(K)
    lam, Q = lam.flip(0), Q.flip(1)
    scale = m * 2.3e-16 * max(float(lam[0]), 1e-300)
    got = torch.from_numpy(T.eigenvalues())
    assert got.shape == (m,) and bool((got[:-1] >= got[1:]).all())
    assert float((got - lam).abs().max()) <= 10 * scale
    first = data.draw(st.integers(0, m - 1), label="first")
    count = data.draw(st.integers(1, m - first), label="count")
    if data.draw(st.booleans(), label="before the spectrum"):  # (bisection finds the band's values itself)
        T = DG.Tridiagonal.of(K.numpy())
        assert T is not None
    band = T.band(first, count)
    assert band is not None
    mu, W = band
    assert mu.shape == (count,) and W.shape == (m, count) and bool(np.all(np.diff(mu) >= 0))
    assert float(np.abs(mu - lam.numpy()[first : first + count][::-1]).max()) <= 10 * scale
    Kn = K.numpy()
    assert float(np.linalg.norm(Kn @ W - W * mu)) <= 100 * scale
    assert float(np.linalg.norm(W.T @ W - np.eye(count))) <= 100 * m * 2.3e-16
    gaps = [float(lam[first - 1] - lam[first])] if first > 0 else []
    gaps += [float(lam[first + count - 1] - lam[first + count])] if first + count < m else []
    gap = min(gaps, default=math.inf)
    if gap > 1e-6 * float(lam[0]):  # a separated band: the subspace is eigh's (Davis--Kahan: residual / gap)
        P = Q[:, first : first + count].numpy()
        assert float(np.linalg.norm(W - P @ (P.T @ W))) <= 100 * scale / gap + 1e-10


def test_band_reuses_the_spectrum_unless_the_tridiagonal_splits(monkeypatch: pytest.MonkeyPatch):
    """After :meth:`~sven.damped_gram.Tridiagonal.eigenvalues`, a band's values are taken from that spectrum
    (no bisection) where :math:`T` is one block; where it splits (here ``K`` with a zero coupling, so an exact zero
    off-diagonal) bisection numbers the blocks, and the band is still ``K``'s eigenpairs."""
    gen = np.random.default_rng(3)
    A = gen.standard_normal((12, 30))
    K = A @ A.T
    T = DG.Tridiagonal.of(K)
    assert T is not None and not T._splits()
    T.eigenvalues()
    calls = []
    bisection = DG.scipy.linalg.lapack.dstebz
    monkeypatch.setattr(DG.scipy.linalg.lapack, "dstebz", lambda *a, **k: calls.append(1) or bisection(*a, **k))
    mu, W = T.band(3, 4)
    assert not calls
    assert float(np.linalg.norm(K @ W - W * mu)) <= 1e-12 * float(np.linalg.norm(K))
    blocks = np.zeros((12, 12))
    blocks[:5, :5], blocks[5:, 5:] = K[:5, :5], K[5:, 5:]
    T = DG.Tridiagonal.of(blocks)
    assert T is not None and T._splits()
    lam = T.eigenvalues()
    mu, W = T.band(3, 4)
    assert calls
    assert float(np.abs(mu - lam[3:7][::-1]).max()) <= 1e-12 * float(lam[0])
    assert float(np.linalg.norm(blocks @ W - W * mu)) <= 1e-12 * float(np.linalg.norm(blocks))
    assert float(np.linalg.norm(W.T @ W - np.eye(4))) <= 1e-12


def test_a_failed_band_declines_to_the_exact_path(monkeypatch: pytest.MonkeyPatch):
    """A band the tridiagonal route cannot give (LAPACK fails) leaves the eigenvectors to the exact path: the
    factorisation declines where the band was needed (the deflation test's problem)."""
    A = torch.diag(torch.tensor([4.0, 2.0, 1e-4], dtype=F64)) @ torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    op = GramOperator(torch.cat([A, torch.zeros(3, 5, dtype=F64)], 1).to(F32))
    D = _damped(op, rtol=1e-2)
    assert D is not None and D._W is not None  # (the band of the value 1e-4, deflated)
    monkeypatch.setattr(DG.Tridiagonal, "band", lambda self, first, count: None)
    assert _damped(op, rtol=1e-2) is None


def test_tridiagonal_spectrum_falls_back_to_dstemr(monkeypatch: pytest.MonkeyPatch):
    """Where ``dsterf`` reports a failure, the spectrum is ``dstemr``'s: the same values to round-off; where both
    fail, it is NaN (and the damped path declines)."""
    K = torch.from_numpy(make_matrix(20, 30, "geometric", 5)[0]).double()
    K = K @ K.T
    T = DG.Tridiagonal.of(K.numpy())
    assert T is not None
    first = T.eigenvalues()
    monkeypatch.setattr(DG.scipy.linalg.lapack, "dsterf", lambda d, e: (np.zeros(20), 1))
    second = T.eigenvalues()
    assert float(np.abs(first - second).max()) <= 100 * 20 * 2.3e-16 * float(first[0])
    ref = torch.linalg.eigvalsh(K).flip(0).numpy()
    assert float(np.abs(second - ref).max()) <= 100 * 20 * 2.3e-16 * float(ref[0])
    monkeypatch.setattr(DG.scipy.linalg.lapack, "dstemr", lambda *a, **k: (0, np.zeros(20), None, 1))
    assert bool(np.isnan(T.eigenvalues()).all())


# --- nothing to cut (rtol = atol = 0): Untruncated, lambda_1 by Lanczos --------------------------------------------


@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from([(1, 4), (2, 7), (24, 60), (40, 16), (33, 33), (128, 300)]),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_top_eigenvalue_is_lambda_1(kind: str, shape: tuple[int, int], scale: float, seed: int):
    r""":func:`~sven.damped_gram.top_eigenvalue` against ``eigvalsh``: a Rayleigh quotient (never above
    :math:`\lambda_1` beyond round-off) within its stopping residual :data:`~sven.damped_gram.LANCZOS_RTOL`
    :math:`\lambda_1` of it, on tall and wide ``A`` (so ``K = A A^T`` full or rank-deficient), every spectrum kind,
    at any scale."""
    A = make_matrix(*shape, kind, seed)[0] * math.sqrt(scale)
    K = A @ A.T
    lam1 = float(np.linalg.eigvalsh(K)[-1])
    theta = DG.top_eigenvalue(K)
    m = shape[0]
    assert theta <= lam1 * (1 + 10 * m * 2.3e-16)
    assert theta >= lam1 * (1 - 2 * DG.LANCZOS_RTOL) - 10 * m * 2.3e-16 * lam1


def test_top_eigenvalue_edge_cases():
    """Zero (an invariant subspace at once), ``1 x 1``, a rank-one ``K`` and a start vector orthogonal to nothing
    found: exact; a non-finite ``K``: NaN."""
    assert DG.top_eigenvalue(np.zeros((5, 5))) == 0.0
    assert DG.top_eigenvalue(np.array([[3.5]])) == 3.5
    u = np.arange(1.0, 9.0)
    assert DG.top_eigenvalue(np.outer(u, u)) == pytest.approx(float(u @ u), rel=1e-13)
    K = np.eye(6)
    K[2, 3] = K[3, 2] = np.nan
    assert math.isnan(DG.top_eigenvalue(K))
    K[2, 3] = K[3, 2] = np.inf
    assert math.isnan(DG.top_eigenvalue(K))


@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from([(24, 60), (40, 16), (32, 32), (1, 9), (9, 1)]),
    dampings=st.lists(st.sampled_from([1e-3, 1e-2, 0.03, 0.1, 1.0]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_untruncated_direction_is_levenberg_marquardt(
    kind: str, shape: tuple[int, int], dampings: list[float], seed: int
):
    r"""With nothing to cut, each direction (retries on one factorisation included) solves the damped normal
    equations :math:`(M^\top M + \lambda I)\,d = M^\top R`, :math:`\lambda = \text{damping}\cdot\sigma_1^2`,
    computed here in float64 from the float32 ``M`` (tall, wide, rank-deficient), to the float32 product
    :math:`M^\top y`'s rounding; its model change is ``M d``; only :math:`\sigma_1` is reported."""
    op, R = _problem(*shape, kind, seed)
    D = _untruncated(op)
    assert isinstance(D, DG.Untruncated) and D.stats["method"] == DG.UNTRUNCATED
    m, n = shape
    M64, R64 = op.M.double(), R.double()
    s1 = float(torch.linalg.matrix_norm(M64, ord=2))
    assert D.rank == min(m, n) and D.cutoff == 0.0 and D.singular_values.shape == (1,)
    assert float(D.singular_values[0]) == pytest.approx(s1, rel=1e-6)
    for damping in dampings:
        d = D.damped_direction(R, damping)
        if d is None:  # (R in K's null space to rounding: not certified; never on these draws with m <= n)
            assert m > n
            continue
        lam = damping * s1**2
        y = torch.linalg.solve(M64 @ M64.T + lam * torch.eye(m, dtype=F64), R64)
        slack = 4 * m * EPS32 * float(M64.norm()) * float(y.norm()) + 1e-6 * float((M64.T @ y).norm())
        normal = M64.T @ M64 @ d.double() + lam * d.double() - M64.T @ R64
        assert float(normal.norm()) <= (s1**2 + lam) * slack
        change = model_change(D, R, damping=damping).double()  # K y, against M d with d = M^T y rounded
        assert float((change - M64 @ d.double()).norm()) <= float(M64.norm()) * slack


def test_untruncated_agrees_with_the_exact_path_where_nothing_is_below_round_off():
    """A full-rank ``M`` whose smallest value (``0.7^23 s_1``) is far above the numerically-zero cut: the exact path
    cuts nothing either, so the two directions are the same to round-off, and reading the factors hands over to it
    (with the default cut)."""
    op, R = _problem(24, 60, "geometric", 11)
    D, F = _untruncated(op), _exact(op)
    assert isinstance(D, DG.Untruncated) and F.rank == 24
    for damping in (0.03, 0.1):
        d = D.damped_direction(R, damping)
        assert d is not None
        ref = _reference(op, R, damping, 24)
        assert float((d.double() - ref).norm()) <= _tolerance(op, R, damping)
    x = D @ R  # the factors: the exact path from now on
    assert D.stats["method"] == "eigh" and D.damped_direction(R, 0.1) is None
    assert float((x - F @ R).norm()) <= 10 * 24 * EPS32 * float((F @ R).norm())


def test_factorize_cuts_nothing_only_where_asked_and_served():
    """:func:`sven.factorize.factorize` with ``untruncated=True``: an :class:`~sven.damped_gram.Untruncated` on the
    damped Cholesky path with the default cut; a ``rtol`` or ``atol`` given, no damping floor, or a tensor ``M``
    (the SVD paths) keep the cut."""
    op, _ = _problem(24, 60, "deficient", 8)
    whole = factorize(op, truncpinv.Auto(), rank=None, rtol=None, atol=0.0, floor=0.1, untruncated=True)
    assert isinstance(whole, DG.Untruncated) and whole.rank == 24 and whole.cutoff == 0.0
    for kwargs in ({"rtol": 1e-3}, {"atol": 1e-6}):
        F = factorize(op, truncpinv.Auto(), **{"rank": None, "rtol": None, "atol": 0.0, **kwargs}, floor=0.1,
                      untruncated=True)  # fmt: skip
        assert not isinstance(F, DG.Untruncated) and F.rank == 12
    for M, floor in ((op, None), (op.M, 0.1)):
        F = factorize(M, truncpinv.Auto(), rank=None, rtol=None, atol=0.0, floor=floor, untruncated=True)
        assert not isinstance(F, DG.DampedGram) and F.rank == 12  # the deficient half is cut
    assert whole.exact().rank == 12  # (the factors: the exact path with the default cut)


def test_untruncated_declines_what_it_cannot_serve():
    """A zero or non-finite Gram matrix goes to the exact path (which reports it); so does a residual in ``K``'s
    null space (:func:`test_a_residual_in_the_null_space_is_not_certified`)."""
    op, _ = _problem(24, 60, "flat", 2)
    assert _untruncated(GramOperator(op.M, torch.zeros(24, 24, dtype=F64))) is None
    bad = op.gram.clone()
    bad[0, 0] = math.nan
    assert _untruncated(GramOperator(op.M, bad)) is None


def test_loss_rule_cuts_nothing_unless_told():
    """The loss rule's damped step on the Gram route cuts nothing (:class:`~sven.damped_gram.Untruncated`); a
    ``rtol`` the user gave is kept, and so is the numerically-zero cut of the GGN rows with no damping floor
    (``damping=0``), of a route that materialises ``M`` (its SVD's re-filtering would amplify the round-off of
    values at zero) and of the regression default."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    cases = (
        ({"route": "gram"}, True), ({"route": "gram", "rtol": 1e-3}, False), ({"route": "gram", "ggn": True}, True),
        ({"route": "gram", "ggn": True, "damping": 0.0}, False), ({"route": "autograd"}, False),
    )  # fmt: skip
    for kwargs, whole in cases:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = sven.Sven(net.parameters(), **kwargs)
        opt.step(lambda net=net: torch.nn.functional.cross_entropy(net(x), y, reduction="none"))
        info = opt.last_step
        assert opt.config.ggn and info is not None
        if whole:
            assert info.rank == 64 and info.cutoff == 0.0 and info.singular_values.shape == (1,)
        else:  # a cut: the user's, or the numerically-zero one
            assert info.rank < 64 and info.singular_values.shape == (64,) and info.cutoff > 0
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = sven.Sven(net.parameters(), residuals=True)
    opt.step(lambda: net(x)[:, 0] - 1.0)
    assert not opt.config.ggn and opt.config.rtol is None and opt.last_step is not None
    assert opt.last_step.singular_values.shape == (32,)
