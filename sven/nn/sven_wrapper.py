r"""``SvenWrapper``: the seed-compatible model wrapper that computes the per-sample Jacobian."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from .. import functional as SF
from .. import seed_errors
from .._compile import eager
from .._validation import _is_int, check_bool, check_fraction, check_positive_float, check_positive_int
from ..linearize.auto import TALL_RATIO
from ..linearize.base import Declined, GramOperator, row_transform
from ..linearize.dense import JACOBIAN_METHODS, PerSampleJacobian, autograd_jacobian, func_jacobian
from ..linearize.gram import GramJacobian, LayerGram

__all__ = ["SvenWrapper"]


class SvenWrapper:
    r"""Wraps a model and a per-sample loss for the seed-compatible Sven API.

    ``loss_and_grad(batch)`` evaluates the per-sample losses
    :math:`\ell_\alpha` of ``batch = (x, *args)``, averages them over
    microbatches if asked, and stores the residuals
    :math:`R = \ell^{\kappa/2}` and their Jacobian
    :math:`M = \partial R/\partial\theta` for :class:`sven.opt.Sven`'s
    ``step()``.

    The model's parameters are re-bound as views of one flat vector
    :attr:`params`, so the optimizer updates them with one operation and the
    model sees the change. Every parameter is optimised (``requires_grad``
    is set on all of them, as in the original wrapper); use the
    ``torch.optim`` form :class:`sven.Sven` to optimise a subset.

    With ``jacobian="auto"`` the Jacobian is not formed at all when the model
    is made of layers the Gram route supports (:mod:`sven.linearize.gram`: Linear,
    Conv1d/2d, Embedding, LayerNorm, RMSNorm): :attr:`grads` is then an
    operator holding ``K = M M^T`` and the products with ``M``
    (microbatching and ``kappa`` are row transforms of ``K``), and the
    optimizer's ``svd_mode`` solver factorises ``K`` (``"torch"``: the exact
    float64 eigendecomposition; the randomized, ``"scipy"`` and ``"lobpcg"``
    modes: the top ``k`` eigenpairs by that solver, certified). Element-wise
    ``param_fraction`` masks use the materialised path. Otherwise the
    Jacobian comes from the fast per-sample path of
    :mod:`sven.linearize.dense` (one forward and one backward pass) when every
    optimised parameter belongs to an ``nn.Linear`` layer and samples are
    verified to be independent, or from ``torch.func.jacrev`` of a
    ``functional_call``, with the buffers passed as inputs so that
    BatchNorm's running statistics are updated exactly once per call.

    Args:
        model: the module.
        loss_fn: ``loss_fn(pred, *args) -> (B,)`` per-sample losses (not
            reduced over the batch). Extra ``args`` come from the batch.
        device: where the model and the flat parameter vector live.
        kappa: residual exponent, :math:`R = \ell^{\kappa/2}` (default 2).
        param_fraction: fraction of the parameters that a step may change;
            a fresh random subset is drawn at each ``loss_and_grad``.
        mask_by_block: draw whole parameter tensors (visited in random order,
            added while they fit in the budget; at least one) instead of
            single entries. Only the selected tensors are differentiated, so
            the Jacobian really shrinks to ``(B, n_active)``.
        microbatch_size: average the losses of consecutive groups of this many
            samples before differentiating: the Jacobian has ``B /
            microbatch_size`` rows. ``B`` must be divisible by it.
        seed: seed (or generator) of the random parameter subsets. ``None``
            (the default, as the original): the global torch RNG, so
            ``torch.manual_seed`` decides the subsets; for an exact resume,
            save and restore ``torch.get_rng_state()`` with the checkpoint
            (the wrapper never touches the global RNG state). With a seed or
            a generator, :meth:`state_dict` saves the generator's state.
        fill_last_block: with ``mask_by_block``, the original's rule (default
            ``True``): tensors in random order, whole while the running total
            stays below ``int(param_fraction * P)``, then the leading entries
            of the next one to reach exactly that many. A step with a partly
            selected tensor uses the materialised Jacobian of the touched
            tensors (not the Gram route), its columns then restricted to the
            selection. ``False``: whole tensors only (each one that fits), so
            the Gram route always applies.
        jacobian: ``"auto"`` (the Gram route or the fast path when valid),
            ``"gram"``, ``"hooks"``, ``"autograd"`` or ``"func"`` (always
            ``torch.func.jacrev``).

    Attributes:
        params: the flat parameter vector (a leaf tensor).
        param_mask: boolean mask of the entries selected for the current step
            (``None`` when ``param_fraction == 1``).
        actual_param_fraction: the selected fraction (whole tensors with
            ``mask_by_block``).
        grads: ``(B', P')`` residual Jacobian of the last ``loss_and_grad``,
            a tensor as in the original. On the Gram route the step never
            forms it; reading ``grads`` materialises it once (``M^T I``
            through the stored layer factors: about one more backward pass
            and ``B' x P'`` memory) and keeps it until the next
            ``loss_and_grad``. :attr:`grads_operator` is what was stored,
            without that cost.
        losses: ``(B',)`` (microbatch-averaged) losses.
        residuals: ``(B',)`` residuals ``losses ** (kappa / 2)``.

    As in the original, the optimizer's ``step()`` deletes ``grads``,
    ``losses`` and ``residuals``: reading them then raises an error that is
    both an ``AttributeError`` (the original's type) and a ``RuntimeError``
    (:class:`sven.seed_errors.MissingJacobianError`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        device: torch.device | str,
        kappa: float = 2.0,
        param_fraction: float = 1.0,
        mask_by_block: bool = False,
        microbatch_size: int = 1,
        *,
        seed: int | torch.Generator | None = None,
        jacobian: str = "auto",
        fill_last_block: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
        self.kappa = check_positive_float("kappa", kappa)
        self.param_fraction = check_fraction("param_fraction", param_fraction)
        self.mask_by_block = check_bool("mask_by_block", mask_by_block)
        self.microbatch_size = int(check_positive_int("microbatch_size", microbatch_size) or 1)
        if jacobian not in (*JACOBIAN_METHODS, "gram", "func"):
            raise ValueError(f"`jacobian` must be one of {[*JACOBIAN_METHODS, 'gram', 'func']}, got {jacobian!r}")
        self.fill_last_block = check_bool("fill_last_block", fill_last_block)
        self.generator: torch.Generator | None
        if seed is None or isinstance(seed, torch.Generator):
            self.generator = seed  # None: the global torch RNG, as the original
        elif not _is_int(seed) or seed < 0:
            raise ValueError(f"`seed` must be None, a non-negative integer or a torch.Generator, got {seed!r}")
        else:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(seed))

        self.device = torch.device(device)
        self.model: nn.Module = model.to(self.device)
        self.loss_fn = loss_fn
        try:
            self.num_loss_args: int = len(inspect.signature(loss_fn).parameters) - 1
        except (TypeError, ValueError):  # builtins without a signature
            self.num_loss_args = -1

        self.param_names_counts_startIdx: list[tuple[str, int, int]] = []
        self.params: torch.Tensor = self._tie_parameters_to_flat()
        self.n_params: int = int(self.params.shape[0])
        self.param_shapes: list[tuple[str, torch.Size, int]] = [
            (name, p.shape, p.numel()) for name, p in self.model.named_parameters()
        ]
        self.param_mask: torch.Tensor | None = None
        self.actual_param_fraction: float = 1.0
        self._block_selection: list[tuple[str, int, int]] = []  # the tensors a block mask touches, flat order
        self._partial_block = False  # one of them is only partly selected

        self._method = jacobian
        self._jac = PerSampleJacobian("hooks" if jacobian == "hooks" else "auto")
        only_linear = all(
            type(mod).forward is nn.Linear.forward
            for mod in self.model.modules()
            if any(True for _ in mod.parameters(recurse=False))
        )
        self._try_hooks = jacobian in ("auto", "hooks") and only_linear
        self._try_gram = jacobian in ("auto", "gram")
        self._gram = LayerGram()
        self._last_rows: int | None = None  # rows of the previous step, for the tall-problem rule

        # populated by loss_and_grad(), consumed (and deleted) by the optimizer's step()
        self._grads: torch.Tensor | GramOperator | None = torch.empty(0, device=self.device)
        self._grads_dense: torch.Tensor | None = None  # ``grads`` materialised from an operator, on demand
        self.losses: torch.Tensor = torch.empty(0, device=self.device)
        self.residuals: torch.Tensor = torch.empty(0, device=self.device)
        self.jacobian_method: str = ""

    # ------------------------------------------------------------------ the stored Jacobian
    @property
    def grads_operator(self) -> torch.Tensor | GramOperator:
        """The residual Jacobian as stored: the tensor, or the Gram route's operator (never materialised)."""
        if self._grads is None:
            raise seed_errors.MissingJacobianError(
                "no Jacobian is stored: the optimizer's step() consumed it; call `loss_and_grad(batch)` first"
            )
        return self._grads

    @property
    def grads(self) -> torch.Tensor:
        """The ``(B', P')`` residual Jacobian as a tensor (materialised once from the Gram operator, see the class)."""
        M = self.grads_operator
        if isinstance(M, torch.Tensor):
            return M
        if self._grads_dense is None:
            eye = torch.eye(M.shape[0], dtype=self.params.dtype, device=self.params.device)
            self._grads_dense = M.rmatmat(eye).T.to(self.params.dtype).contiguous()
        return self._grads_dense

    @grads.setter
    def grads(self, value: torch.Tensor | GramOperator) -> None:
        self._grads, self._grads_dense = value, None

    @grads.deleter
    def grads(self) -> None:
        if self._grads is None:
            raise AttributeError("grads")
        self._grads, self._grads_dense = None, None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x``, without gradient tracking."""
        return self.model(x)

    @torch.no_grad()
    def evaluate_and_loss(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """Per-sample losses ``loss_fn(model(x), *args)`` (not microbatch-averaged)."""
        return self._checked_losses(self.model(x), args, x)

    def _checked_losses(self, pred: torch.Tensor, args: Sequence[Any], x: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(pred, *args)
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"`loss_fn` must return a tensor of per-sample losses, got {type(losses).__name__}")
        b = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        if losses.dim() == 0:
            raise seed_errors.BatchShapeError(
                f"`loss_fn` returned a scalar, but Sven needs one loss per sample, shape (B,)"
                f"{f' = ({b},)' if b is not None else ''}: use reduction='none' and reduce only the non-batch "
                f"dimensions, e.g. `loss_fn = lambda pred, y: ((pred - y) ** 2).sum(dim=-1)` instead of nn.MSELoss()"
            )
        if losses.dim() != 1:
            raise ValueError(
                f"`loss_fn` returned shape {tuple(losses.shape)}, but Sven needs one loss per sample, shape (B,): "
                f"reduce the non-batch dimensions, e.g. `.sum(dim=-1)`"
            )
        if b is not None and losses.shape[0] != b:
            raise ValueError(
                f"`loss_fn` returned {losses.shape[0]} losses for a batch of {b} samples: it must return one loss "
                f"per sample, shape ({b},)"
            )
        if losses.shape[0] == 0:
            raise ValueError("the batch is empty (0 samples): Sven needs at least one sample")
        if not losses.is_floating_point():
            raise TypeError(f"`loss_fn` must return floating-point losses, got dtype {losses.dtype}")
        return losses

    # ------------------------------------------------------------------ Jacobian
    def loss_and_grad(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate the losses of ``batch = (x, *args)`` and store the residual Jacobian.

        Works inside ``torch.no_grad()`` (as the original's ``torch.func`` did):
        the Jacobian is computed with grad mode on.

        Returns:
            ``(losses, preds)``, both detached; ``losses`` has one entry per
            microbatch.
        """
        with torch.enable_grad(), eager():  # a torch.compile'd model runs eagerly here (sven/_compile.py)
            return self._loss_and_grad(batch)

    def _loss_and_grad(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)) or len(batch) == 0:
            raise TypeError("`batch` must be a tuple (x, *args), e.g. (x, y)")
        x, *args = batch
        self._draw_mask()

        if self.param_mask is not None and self.mask_by_block:
            names = [name for name, _, _ in self._block_selection]
        else:
            names = [name for name, _, _ in self.param_names_counts_startIdx]
        named = dict(self.model.named_parameters())
        active = [named[n] for n in names]

        preds: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            pred = self.model(x)
            preds.append(pred)
            return pred

        def rows(pred: torch.Tensor) -> torch.Tensor:
            return self._checked_losses(pred, args, x)

        # under "auto", more rows than parameters: M is smaller than K (sven.linearize.auto, rule 4); the
        # previous step's rows decide before the closure runs, the Gram route itself on the first step
        max_rows = int(TALL_RATIO * sum(p.numel() for p in active)) if self._method == "auto" else None
        tall = max_rows is not None and self._last_rows is not None and self._last_rows > max_rows
        if (
            self._try_gram
            and not tall
            and (self.param_mask is None or (self.mask_by_block and not self._partial_block))
        ):
            active_names = names
            gres = self._gram(closure, active, rows=rows, names=active_names, max_rows=max_rows)
            if isinstance(gres, GramJacobian):
                self._last_rows = int(gres.output.shape[0])
                return self._store_gram(gres, preds[-1].detach())
            if self._method == "gram":
                raise ValueError(f"`jacobian='gram'` does not apply to this model: {gres.reason}")
            if not isinstance(gres, Declined):  # declined (tall): the materialised Jacobian, without a warning
                warnings.warn(
                    f"Sven: the Gram route does not apply ({gres.reason}); using the materialised Jacobian instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._try_gram = False
                self._try_hooks = False  # the Gram route covers every model the Linear hook path covers
            losses, J, method = gres.output.detach(), autograd_jacobian(gres.output, active), "autograd"
            pred = preds[-1].detach()
        elif self._try_hooks:
            res = self._jac(closure, active, rows=rows)
            losses, J, method = res.output, res.jacobian, res.method
            pred = preds[-1].detach()
            if method != "hooks":  # samples are coupled: use torch.func from now on
                self._try_hooks = False
        elif self._method == "autograd":
            res = PerSampleJacobian("autograd")(closure, active, rows=rows)
            losses, J, method, pred = res.output, res.jacobian, res.method, preds[-1].detach()
        else:
            losses, J, pred = func_jacobian(self.model, names, rows, (x,))
            method = "func"

        self._last_rows = int(losses.shape[0])
        if self.param_mask is not None and not self.mask_by_block:
            J = J[:, self.param_mask]
        elif self.param_mask is not None and self._partial_block:  # columns of the touched tensors -> selection
            J = J[:, torch.cat([self.param_mask[s : s + n] for _, n, s in self._block_selection])]
        losses = self._group_rows(losses)
        J = self._group_rows(J)
        R, M = SF.residual_jacobian(losses, J, kappa=self.kappa)
        self.grads = M.detach()
        self.losses = losses.detach()
        self.residuals = R.detach()
        self.jacobian_method = method
        return self.losses, pred

    def _group_rows(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`sven.functional.group_rows`, its error also a ``RuntimeError`` (the original's type)."""
        try:
            return SF.group_rows(x, size=self.microbatch_size)
        except ValueError as err:
            raise seed_errors.BatchShapeError(str(err)) from None

    def _store_gram(self, G: GramJacobian, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Microbatching and ``kappa`` as row transforms of the Gram route: ``M = diag(s) A J``."""
        losses = G.output
        M: GramOperator = G
        if self.microbatch_size > 1:
            n = losses.shape[0]
            if n % self.microbatch_size:
                self._group_rows(losses)  # raises the documented error
            groups = torch.arange(n, device=losses.device) // self.microbatch_size
            avg = torch.zeros(n // self.microbatch_size, n, dtype=torch.float64, device=losses.device)
            avg[groups, torch.arange(n, device=losses.device)] = 1.0 / self.microbatch_size
            M = row_transform(M, avg)
            losses = self._group_rows(losses)
        R, scale = SF.residual_scale(losses, kappa=self.kappa)
        if self.kappa != 2.0:
            M = row_transform(M, scale)
        self.grads = M
        self.losses = losses.detach()
        self.residuals = R.detach()
        self.jacobian_method = "gram"
        return self.losses, pred

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the model's state dict and the parameter-mask RNG state.

        Together with :meth:`sven.opt.Sven.state_dict` this makes a resumed
        run bit-identical on the CPU, ``param_fraction`` masks included, when
        the masks come from ``seed``/a generator; with the default global RNG
        save ``torch.get_rng_state()`` too.
        """
        if self.generator is None:  # the global RNG: the user's own seeding governs the masks
            return {"model": self.model.state_dict()}
        return {"model": self.model.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (copies into the flat parameter vector in place)."""
        if not isinstance(state_dict, dict) or "model" not in state_dict:
            raise ValueError("`state_dict` must be a dict from SvenWrapper.state_dict() with a 'model' entry")
        with torch.no_grad():
            self.model.load_state_dict(state_dict["model"])
        if "generator" in state_dict and self.generator is not None:
            self.generator.set_state(state_dict["generator"])

    # ------------------------------------------------------------------ parameters
    def _tie_parameters_to_flat(self) -> torch.Tensor:
        """Copy the parameters into one flat vector and re-bind them as views of it."""
        params = list(self.model.parameters())
        if len({id(p) for p in params}) != len(params):  # pragma: no cover - named_parameters dedups
            raise ValueError("shared parameters are not supported")
        frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad]
        if frozen:
            shown = ", ".join(repr(n) for n in frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
            warnings.warn(
                f"SvenWrapper optimises every parameter (as the original wrapper), so the parameters with "
                f"requires_grad=False ({shown}) will be trained; to keep them fixed, use the torch.optim form "
                f"sven.Sven(p for p in model.parameters() if p.requires_grad) with a closure",
                UserWarning,
                stacklevel=3,
            )
        flat = parameters_to_vector(params).detach().clone() if params else torch.zeros(0, device=self.device)
        start = 0
        for name, p in list(self.model.named_parameters()):
            n = p.numel()
            view = flat[start : start + n].view_as(p)
            self.param_names_counts_startIdx.append((name, n, start))
            start += n
            mod: nn.Module = self.model
            *prefix, leaf = name.split(".")
            for part in prefix:
                mod = getattr(mod, part)
            # every parameter is optimised (as in the original wrapper), frozen or not
            mod._parameters[leaf] = nn.Parameter(view, requires_grad=True)
        return flat.requires_grad_(True)

    def _draw_mask(self) -> None:
        if self.param_fraction >= 1.0:
            self.param_mask = None
            self.actual_param_fraction = 1.0
            return
        if self.mask_by_block:
            mask = self._make_param_mask_by_block(self.param_fraction)
        else:
            mask = self._make_param_mask()
        self.param_mask = mask.to(self.params.device)

    def _make_param_mask(self) -> torch.Tensor:
        """A random boolean mask selecting ``int(param_fraction * P)`` entries (at least one)."""
        n_active = max(1, int(self.param_fraction * self.n_params))
        mask = torch.zeros(self.n_params, dtype=torch.bool)
        mask[torch.randperm(self.n_params, generator=self.generator)[:n_active]] = True
        self.actual_param_fraction = n_active / self.n_params
        return mask

    def _make_param_mask_by_block(self, fraction: float) -> torch.Tensor:
        """Parameter tensors in random order until ``int(fraction * P)`` entries are selected.

        ``fill_last_block=True`` (default, the original's rule): whole tensors
        while they stay below the target, then the leading entries of the next
        one, so that exactly the target is selected. ``False``: only whole
        tensors, each one that fits in the remaining budget. Either way at
        least one entry (a target of 0 selects the smallest tensor).
        """
        blocks = self.param_names_counts_startIdx
        target = int(fraction * self.n_params)
        selected: list[tuple[str, int, int]] = []
        partial: tuple[tuple[str, int, int], int] | None = None  # a tensor and how many leading entries
        running = 0
        for i in torch.randperm(len(blocks), generator=self.generator).tolist():
            name, n, start = blocks[i]
            if self.fill_last_block and running + n >= target:
                if target - running == n:
                    selected.append((name, n, start))
                elif target > running:
                    partial = ((name, n, start), target - running)
                running = target
                break
            if running + n <= target:
                selected.append((name, n, start))
                running += n
        if not selected and partial is None:
            selected.append(min(blocks, key=lambda blk: blk[1]))
            running = selected[0][1]
        mask = torch.zeros(self.n_params, dtype=torch.bool)
        for _, n, start in selected:
            mask[start : start + n] = True
        self._partial_block = partial is not None
        if partial is not None:
            (name, n, start), used = partial
            mask[start : start + used] = True
            selected.append((name, n, start))
        selected.sort(key=lambda blk: blk[2])  # flat order, matching the Jacobian columns
        self._block_selection = selected
        self.actual_param_fraction = running / self.n_params
        return mask
