"""sven.pinn: derivatives of known functions, collocation points, terms and their errors, the preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import vmap

import sven
from sven import pinn

DT = torch.float64


def _points(n: int = 6, d: int = 2) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(0), dtype=DT) * 2 - 1


def test_laplacian_of_known_functions() -> None:
    x = _points()
    four = vmap(lambda z: pinn.laplacian(lambda w: (w**2).sum(), z))(x)
    torch.testing.assert_close(four, torch.full((6,), 4.0, dtype=DT), rtol=0, atol=1e-12)
    # the Poisson solution: -Laplacian(sin(pi x) sin(pi y)) = 2 pi^2 sin(pi x) sin(pi y)
    s = lambda w: torch.sin(math.pi * w[0]) * torch.sin(math.pi * w[1])  # noqa: E731
    lap = vmap(lambda z: pinn.laplacian(s, z))(x)
    torch.testing.assert_close(lap, -2 * math.pi**2 * vmap(s)(x), rtol=1e-12, atol=1e-12)
    # vector-valued: one Laplacian per component, in 3-D
    v = lambda w: torch.stack([w[0] ** 2 * w[1], torch.exp(w[2])])  # noqa: E731
    x3 = _points(4, 3)
    expected = torch.stack([2 * x3[:, 1], torch.exp(x3[:, 2])], dim=1)
    torch.testing.assert_close(vmap(lambda z: pinn.laplacian(v, z))(x3), expected, rtol=1e-12, atol=1e-12)


def test_gradient_hessian_derivative_divergence() -> None:
    x = _points()
    u = lambda w: torch.sin(w[0]) * w[1] ** 3  # noqa: E731
    g = vmap(lambda z: pinn.gradient(u, z))(x)
    torch.testing.assert_close(
        g, torch.stack([torch.cos(x[:, 0]) * x[:, 1] ** 3, 3 * torch.sin(x[:, 0]) * x[:, 1] ** 2], 1)
    )
    H = vmap(lambda z: pinn.hessian(u, z))(x)
    torch.testing.assert_close(H[:, 0, 1], 3 * torch.cos(x[:, 0]) * x[:, 1] ** 2)
    torch.testing.assert_close(H[:, 0, 1], H[:, 1, 0])
    d011 = vmap(lambda z: pinn.derivative(u, z, 0, 1, 1))(x)
    torch.testing.assert_close(d011, 6 * torch.cos(x[:, 0]) * x[:, 1])
    torch.testing.assert_close(vmap(lambda z: pinn.derivative(u, z))(x), vmap(u)(x))
    torch.testing.assert_close(vmap(lambda z: pinn.derivative(u, z, np.int64(1), 1))(x), H[:, 1, 1])
    div = vmap(lambda z: pinn.divergence(lambda w: pinn.gradient(u, w), z))(x)
    torch.testing.assert_close(div, H[:, 0, 0] + H[:, 1, 1])


def test_derivative_errors_name_the_argument() -> None:
    x = _points()[0]
    with pytest.raises(ValueError, match=r"`index\[1\]` must be an integer in \[0, 2\)"):
        pinn.derivative(lambda w: w.sum(), x, 0, 2)
    with pytest.raises(ValueError, match="`v` must return a vector field with 2 components"):
        pinn.divergence(lambda w: w.sum(), x)


def test_box_points_are_deterministic_and_where_they_belong() -> None:
    box = pinn.Box([0, np.float64(-1)], [1, 1])
    a, b = box.interior(50, seed=3), box.interior(np.int64(50), seed=3)
    assert torch.equal(a, b) and not torch.equal(a, box.interior(50, seed=4))
    assert a.dtype == DT and a.shape == (50, 2)
    assert bool((a[:, 0] >= 0).all() and (a[:, 0] <= 1).all() and (a[:, 1] >= -1).all() and (a[:, 1] <= 1).all())
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(box.interior(50, generator=gen), a)
    sq = pinn.Box([0, 0], [1, 1]).boundary(120, seed=0)
    on = [int((sq[:, j] == v).sum()) for j in (0, 1) for v in (0.0, 1.0)]
    assert sq.shape == (120, 2) and on == [30, 30, 30, 30]
    # a 1 x 2 box: faces weighted by length, 7 points -> 2, 2, 1, 1 plus the largest remainders
    bd = box.boundary(7, seed=0)
    assert bd.shape == (7, 2)
    on_face = (bd[:, 0] == 0) | (bd[:, 0] == 1) | (bd[:, 1] == -1) | (bd[:, 1] == 1)
    assert bool(on_face.all())
    g = pinn.Box([0, 0, 0], [1, 2, 3]).grid(3)
    assert g.shape == (27, 3) and float(g[:, 2].max()) == 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lower": [0, 0], "upper": [1]}, ValueError, "the same positive length"),
        ({"lower": [0, 1], "upper": [1, 1]}, ValueError, r"`lower\[1\]` must be less than `upper\[1\]`"),
        ({"lower": [0, float("nan")], "upper": [1, 1]}, ValueError, r"`lower\[1\]` must be a finite real number"),
        ({"lower": "ab", "upper": [1, 1]}, ValueError, "`lower` must be a sequence of numbers"),
        ({"lower": [0], "upper": [1], "dtype": torch.int64}, TypeError, "`dtype` must be a floating"),
    ],
)
def test_box_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pinn.Box(**kwargs)


def test_sampler_errors() -> None:
    box = pinn.Box([0], [1])
    with pytest.raises(ValueError, match="`n` must be a positive integer, got 0"):
        box.interior(0)
    with pytest.raises(ValueError, match=r"`n` must be a positive integer, got 2\.5"):
        box.boundary(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`seed` must be a non-negative integer"):
        box.interior(3, seed=-1)
    with pytest.raises(TypeError, match=r"`generator` must be a torch\.Generator"):
        box.interior(3, generator=0)  # type: ignore[arg-type]
    assert box.boundary(2).sort(dim=0).values.flatten().tolist() == [0.0, 1.0]


def test_term_weights_and_errors() -> None:
    x = _points(9)
    assert pinn.Term(lambda u, z: u(z), x).weight == pytest.approx(1 / 3)
    assert pinn.Term(lambda u, z: u(z), x, weight=np.float32(0.5)).weight == 0.5
    with pytest.raises(ValueError, match="`weight` must be non-negative"):
        pinn.Term(lambda u, z: u(z), x, weight=-1.0)
    with pytest.raises(ValueError, match="`weight` must be a non-negative number or 'mean'"):
        pinn.Term(lambda u, z: u(z), x, weight="sum")
    with pytest.raises(ValueError, match=r"`points` must have shape \(n, d\)"):
        pinn.Term(lambda u, z: u(z), x[:, 0])
    with pytest.raises(TypeError, match="`points` must be a floating-point tensor"):
        pinn.Term(lambda u, z: u(z), np.zeros((3, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`data\[0\]` must be a tensor with 9 rows"):
        pinn.Term(lambda u, z, y: u(z) - y, x, data=torch.zeros(8))
    with pytest.raises(TypeError, match="`residual` must be callable"):
        pinn.Term(3, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`value` must be a finite real number"):
        pinn.dirichlet(x, value="zero")  # type: ignore[arg-type]


def test_residuals_errors_and_values() -> None:
    net = torch.nn.Linear(2, 1).double()
    x = _points()
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module"):
        pinn.Residuals(lambda z: z, [pinn.dirichlet(x)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`terms` must hold at least one"):
        pinn.Residuals(net, [])
    with pytest.raises(TypeError, match=r"`terms\[0\]` \('boundary'\) has points of dtype torch.float32"):
        pinn.Residuals(net, [pinn.dirichlet(x.float())])
    # a linear model: the boundary residual is (w.x + b - g) / sqrt(n), g a function of the point
    problem = pinn.Residuals(net, pinn.dirichlet(x, lambda z: z[0], weight=np.float64(2.0)))
    with torch.no_grad():
        expected = 2.0 * (net(x)[:, 0] - x[:, 0])
    torch.testing.assert_close(problem(), expected)


def test_preset_configures_sven_and_takes_overrides() -> None:
    net = torch.nn.Linear(2, 1).double()
    opt = pinn.optimizer(net.parameters(), damping=1e-2, rtol=np.float64(1e-12))
    assert isinstance(opt, sven.Sven)
    assert opt.residuals and opt.rank is None and opt.adaptive_damping and opt.rtol == 1e-12
    assert opt.param_groups[0]["lr"] == 1.0 and opt.control.damping == 1e-2
    with pytest.raises(TypeError, match="unknown option `nonsense`"):
        pinn.optimizer(net.parameters(), nonsense=0.9)


def test_docs_pinn_md_runs(one_thread: None) -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "pinn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/pinn.md[block {i}]", "exec"), namespace)
    problem = namespace["problem"]
    assert float(problem().pow(2).sum()) < 1e-3  # from about 75 at the start  # type: ignore[operator]
