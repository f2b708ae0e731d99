"""The benchmark task recipes of docs/tasks.md: shapes, standardisation, determinism and the quirks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sven.tasks
from sven.bench.tasks import TASKS, Task, TaskData, get_task
from sven.bench.tasks.polynomial import polynomial_terms, polynomial_values


def _same(a: TaskData, b: TaskData) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_val", "y_val"))


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if issubclass(t, Task)])
def test_every_task_is_deterministic_and_well_formed(name: str) -> None:
    a, b = get_task(name), get_task(name)
    assert isinstance(a, Task) and isinstance(b, Task) and a.name == name
    da, db = a.data(), b.data()
    assert _same(da, db)  # built twice from the recipe's seeds: identical
    assert a.data() is da  # cached
    inputs = torch.int64 if name == "charlm" else torch.float32  # charlm's inputs are character ids
    assert da.x_train.dtype == inputs and da.x_val.dtype == inputs
    assert da.x_train.shape[0] == da.y_train.shape[0] and da.x_val.shape[0] == da.y_val.shape[0]
    # the model seed changes the weights only, deterministically
    m0, m0b, m1 = a.model(0), a.model(0), a.model(1)
    w0, w0b, w1 = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (m0, m0b, m1))
    assert torch.equal(w0, w0b) and not torch.equal(w0, w1)
    # per-sample losses, one per sample, and a finite evaluation
    xb, yb = da.x_train[:7], da.y_train[:7]
    assert a.per_sample_loss(m0(xb), yb).shape == (7,)
    ev = a.evaluate(m0, da.x_val, da.y_val)
    assert set(ev) == {"loss", *a.metric_names} and math.isfinite(ev["loss"])
    assert 0 < a.sven_defaults["rank"] <= a.batch_size
    assert a.target > 0


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match="unknown task 'mnist'; valid tasks: toy1d, polynomial, digits, digits-ce, poisson2d, heat1d, "
        "mnist-subset, mnist-subset-mse, mnist-subset-cnn, mnist1d, charlm, gru",
    ):
        get_task("mnist")


def test_subsample_keeps_a_prefix_and_checks_its_argument() -> None:
    d = get_task("toy1d").data()
    s = d.subsample(100)
    assert s.n_train == 100 and torch.equal(s.x_train, d.x_train[:100]) and s.x_val is d.x_val
    assert s.info["n_train_full"] == 10_000
    assert d.subsample(10**6) is d
    with pytest.raises(ValueError, match="`n_train` must be a positive int, got 0"):
        d.subsample(0)


# --------------------------------------------------------------------------- toy1d
def test_toy1d_recipe() -> None:
    task = get_task("toy1d")
    d = task.data()
    assert d.x_train.shape == d.y_train.shape == d.x_val.shape == d.y_val.shape == (10_000, 1)
    assert float(d.x_train.min()) >= -1 and float(d.x_train.max()) <= 1
    assert abs(float(d.y_train.mean())) < 1e-5 and abs(float(d.y_train.std()) - 1) < 1e-5
    # the recipe: one generator seeded 54631, train first, targets standardised with the training statistics
    g = torch.Generator().manual_seed(54631)
    x_train = torch.rand(10_000, 1, generator=g) * 2 - 1
    x_val = torch.rand(10_000, 1, generator=g) * 2 - 1
    assert torch.equal(d.x_train, x_train) and torch.equal(d.x_val, x_val)
    f = torch.exp(-10 * x_val**2) * torch.sin(2 * x_val)
    assert torch.allclose(d.y_val * d.info["y_std"] + d.info["y_mean"], f, atol=1e-6)
    assert sum(p.numel() for p in task.model(0).parameters()) == 593
    assert task.batch_size == 32 and task.loader_seed == 51159


def test_sven_tasks_reexports_the_toy1d_recipe() -> None:
    from sven.bench.tasks import base, toy1d

    assert sven.tasks.make_toy1d is toy1d.make_toy1d and sven.tasks.target_fn is toy1d.target_fn
    assert sven.tasks.Toy1D is toy1d.Toy1D
    assert sven.tasks.mlp is base.mlp and sven.tasks.batches is base.batches
    assert sven.tasks.per_sample_mse is base.per_sample_mse
    assert (sven.tasks.DATA_SEED, sven.tasks.LOADER_SEED) == (54631, 51159)
    data = sven.tasks.make_toy1d(50, 20)
    assert data.x_train.shape == (50, 1) and isinstance(data, sven.tasks.Toy1D)


# --------------------------------------------------------------------------- polynomial
def _count_terms(max_degree: int, n_vars: int) -> int:
    """Number of tuples in range(d)^n_vars with sum d, summed over d, by dynamic programming over the variables."""
    total = 0
    for d in range(max_degree + 1):
        ways = [1] + [0] * d  # ways[s]: tuples of the variables so far with sum s, entries in range(d)
        for _ in range(n_vars):
            ways = [sum(ways[s - e] for e in range(d) if e <= s) for s in range(d + 1)]
        total += ways[d]
    return total


def _lexicographic(d: int, n: int, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """All tuples in range(d)^n in lexicographic order, by recursion."""
    if len(prefix) == n:
        return [prefix]
    return [t for e in range(d) for t in _lexicographic(d, n, (*prefix, e))]


def test_polynomial_term_enumeration() -> None:
    terms = polynomial_terms()
    assert len(terms) == _count_terms(4, 6)
    expected = [p for d in range(5) for p in _lexicographic(d, 6) if sum(p) == d]
    assert terms == expected
    assert all(max(p) < 4 for p in terms)  # range(d) never reaches d: no exponent above 3


def test_polynomial_recipe_and_additive_form() -> None:
    task = get_task("polynomial")
    d = task.data()
    assert d.x_train.shape == d.x_val.shape == (10_000, 6) and d.y_train.shape == d.y_val.shape == (10_000, 1)
    assert abs(float(d.y_train.mean())) < 1e-5 and abs(float(d.y_train.double().std(correction=0)) - 1) < 1e-5
    assert abs(float(d.x_train.mean())) < 0.05 and abs(float(d.x_train.std()) - 1) < 0.05  # N(0, I), not rescaled
    assert sum(p.numel() for p in task.model(0).parameters()) == 673
    assert task.batch_size == 32 and task.loader_seed == 82464

    # the draw order: coefficients, then train x, then validation x, from one default_rng(57728)
    terms = [p for deg in range(5) for p in _lexicographic(deg, 6) if sum(p) == deg]
    rng = np.random.default_rng(57728)
    coeffs = rng.normal(size=len(terms))
    x_train = rng.normal(size=(10_000, 6))
    x_val = rng.normal(size=(10_000, 6))
    assert np.allclose(d.x_train.numpy(), x_train, atol=1e-6) and np.allclose(d.x_val.numpy(), x_val, atol=1e-6)
    # f(x) = sum_t c_t (1 + sum_j x_j ** p_tj), point by point
    raw_val = d.y_val.double().squeeze(1).numpy() * d.info["y_std"] + d.info["y_mean"]
    for i in (0, 1, 4_321, 9_999):
        f = sum(c * (1 + sum(x_val[i, j] ** p[j] for j in range(6))) for c, p in zip(coeffs, terms))
        assert f == pytest.approx(raw_val[i], rel=1e-5, abs=1e-3)
    # standardised with the training mean and (ddof=0) std
    y_train = polynomial_values(x_train, coeffs, terms)
    assert d.info["y_mean"] == pytest.approx(float(np.mean(y_train)), rel=1e-12)
    assert d.info["y_std"] == pytest.approx(float(np.std(y_train)), rel=1e-12)


def test_polynomial_is_additive() -> None:
    """No interaction between inputs: f(u_A, v_B) + f(v_A, u_B) == f(u) + f(v) for any split A, B."""
    terms = polynomial_terms()
    coeffs = np.random.default_rng(0).normal(size=len(terms))
    u, v = np.random.default_rng(1).normal(size=(2, 5, 6))
    a = np.array([True, False, True, True, False, False])
    mixed1, mixed2 = np.where(a, u, v), np.where(a, v, u)
    lhs = polynomial_values(mixed1, coeffs, terms) + polynomial_values(mixed2, coeffs, terms)
    rhs = polynomial_values(u, coeffs, terms) + polynomial_values(v, coeffs, terms)
    assert np.allclose(lhs, rhs, rtol=1e-10, atol=1e-8)
    with pytest.raises(ValueError, match="`x` must be"):
        polynomial_values(u[:, :5], coeffs, terms)


# --------------------------------------------------------------------------- digits
def test_digits_recipe_split_is_stratified_80_20() -> None:
    task = get_task("digits")
    d = task.data()
    assert d.x_train.shape == (1437, 64) and d.x_val.shape == (360, 64)
    assert d.n_val == math.ceil(0.2 * 1797) and d.y_train.dtype == torch.int64
    # standardised after scaling to [0, 1]: one mean and one std over all training pixels
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.double().std(correction=0)) - 1) < 1e-5
    assert 0 < d.info["x_mean"] < 1 and 0 < d.info["x_std"] < 1
    # stratified: every class keeps its share in both parts
    counts = torch.bincount(torch.cat([d.y_train, d.y_val]), minlength=10)
    val_counts = torch.bincount(d.y_val, minlength=10)
    assert int(counts.sum()) == 1797
    assert torch.all((val_counts - 0.2 * counts).abs() <= 1)
    # the split is the sklearn one
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    _, _, y_tr, y_va = train_test_split(raw.data, raw.target, test_size=0.2, stratify=raw.target, random_state=0)
    assert np.array_equal(d.y_train.numpy(), y_tr) and np.array_equal(d.y_val.numpy(), y_va)
    assert sum(p.numel() for p in task.model(0).parameters()) == 4522 and task.batch_size == 64


def test_digits_losses_and_accuracy() -> None:
    mse, ce = get_task("digits"), get_task("digits-ce")
    assert torch.equal(mse.data().x_train, ce.data().x_train)
    y = torch.tensor([0, 3])
    pred = torch.nn.functional.one_hot(y, 10).float()
    assert torch.equal(mse.per_sample_loss(pred, y), torch.zeros(2))
    pred2 = pred.clone()
    pred2[1, 3], pred2[1, 5] = 0.0, 2.0
    assert mse.per_sample_loss(pred2, y).tolist() == [0.0, 5.0]
    assert mse.metrics(pred2, y) == {"accuracy": 0.5}
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(ce.per_sample_loss(logits, labels), -torch.log_softmax(logits, -1)[range(4), labels])
    assert ce.sven_defaults["kappa"] == 2.0
