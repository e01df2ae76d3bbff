"""Lightning's automatic optimization step for the common case, with the same hooks and effects and fewer layers.

Every training step, Lightning's automatic optimization passes through a closure object, ``LightningOptimizer``, the
strategy and the precision plugin, and dispatches about a dozen hooks (each to every callback, whether or not it
overrides the hook). On a small model that is a visible share of the step (``benchmarks/framework_overhead.py``
measures it; the README has the figures).

:class:`DirectOptimization` runs the same step directly where nothing in those layers can differ from what they
would do: one unwrapped module on one device (no DDP wrapper), 32-bit, bf16-mixed (no gradient scaler) or
bf16/16-true precision, no gradient accumulation, the module's own ``optimizer_step`` left as Lightning's, and the
default (no-op) profiler. It keeps, in Lightning's order and with the same ``_current_fx_name``:

- ``optimizer.step(closure)`` with a closure, so LBFGS and other closure-calling optimizers see what Lightning gives;
- in the closure: ``training_step`` (in the precision plugin's train-step context), ``on_before_zero_grad``,
  ``optimizer_zero_grad``, ``on_before_backward``, ``backward``, ``on_after_backward``, then
  ``on_before_optimizer_step`` and ``configure_gradient_clipping``;
- the optimizer's progress counters (``global_step`` and checkpoints read them) and the step output
  (``{"loss": detached loss, **extra}``) that ``on_train_batch_end`` receives.

Callback hooks go only to callbacks that override them (the rest are Lightning's no-ops). Anything else falls back to
Lightning's own loop, per step: a wrapped model (DDP, FSDP), a gradient scaler (16-mixed), accumulation, a custom
``optimizer_step``, a strategy or precision plugin that changes any of these methods, or a profiler. Setting the
environment variable ``LIGHTNING_TRANSFER_DIRECT_STEP=0`` keeps Lightning's loop for every step.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loops.optimization.automatic import ClosureResult, _AutomaticOptimization
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch.optim import Optimizer

from lightning_transfer.profiling import NullProfiler

ENV_SWITCH = "LIGHTNING_TRANSFER_DIRECT_STEP"

# the methods the direct step stands in for: a strategy or precision plugin that overrides any of them does
# something in Lightning's path that the direct step would not, so the step falls back
_STRATEGY_METHODS = ("training_step", "post_training_step", "backward", "pre_backward", "post_backward",
                     "optimizer_step")
_PRECISION_METHODS = ("pre_backward", "backward", "post_backward", "optimizer_step", "_wrap_closure", "_after_closure",
                      "_clip_gradients")
_CALLBACK_HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
_warnings = WarningCache()


def enabled() -> bool:
    """False where ``LIGHTNING_TRANSFER_DIRECT_STEP`` is set to 0/false/no/off (Lightning's loop for every step)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _same_methods(obj: object, base: type, names: tuple[str, ...]) -> bool:
    return all(getattr(type(obj), name, None) is getattr(base, name) for name in names)


def _overrides(obj: object, base: type, name: str) -> bool:
    return name in getattr(obj, "__dict__", {}) or getattr(type(obj), name, None) is not getattr(base, name)


def _plain_precision(plugin: Precision) -> bool:
    if type(plugin) is MixedPrecision:  # bf16-mixed: no scaler, and then its overrides are the base's
        return plugin.scaler is None
    return _same_methods(plugin, Precision, _PRECISION_METHODS)


@dataclass(frozen=True)
class _Plan:
    """What one fit's direct steps call: the callbacks' overriding hooks and the module's, looked up once."""

    module: LightningModule
    callback_hooks: dict[str, tuple[Callable[..., Any], ...]]
    module_hooks: dict[str, Callable[..., Any] | None]  # None where the module keeps LightningModule's no-op
    clipping_overridden: bool


def _plan(trainer: Trainer, optimizer: Optimizer) -> _Plan | None:
    """The direct step's plan for this trainer, or None where Lightning's loop has to run the step (see module doc)."""
    module = trainer.lightning_module
    strategy = trainer.strategy
    if (
        not enabled()
        or type(trainer.profiler) not in (PassThroughProfiler, NullProfiler)  # type: ignore[attr-defined]
        or strategy.model is not module
        or strategy.handles_gradient_accumulation
        or not _same_methods(strategy, Strategy, _STRATEGY_METHODS)
        or not _plain_precision(strategy.precision_plugin)
        or _overrides(module, LightningModule, "optimizer_step")
        or len(strategy.optimizers) != 1 or strategy.optimizers[0] is not optimizer
    ):
        return None
    callback_hooks = {
        hook: tuple(getattr(cb, hook) for cb in trainer.callbacks  # type: ignore[attr-defined]
                    if _overrides(cb, Callback, hook))
        for hook in _CALLBACK_HOOKS
    }
    module_hooks = {hook: getattr(module, hook) if _overrides(module, LightningModule, hook) else None
                    for hook in _CALLBACK_HOOKS}
    return _Plan(module, callback_hooks, module_hooks,
                 _overrides(module, LightningModule, "configure_gradient_clipping"))


class DirectOptimization(_AutomaticOptimization):
    """Lightning's automatic optimization, run directly where that cannot change what a step does (module doc)."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self._plan_key: tuple = ()
        self._cached_plan: _Plan | None = None
        self.direct_steps = 0  # steps this loop ran directly (the rest went through Lightning's loop)

    def _plan_for(self, optimizer: Optimizer) -> _Plan | None:
        trainer = self.trainer
        strategy = trainer.strategy
        # what the plan depends on that can change between fits or epochs (callbacks, strategy, plugin, profiler)
        key = (id(trainer.lightning_module), id(strategy), id(strategy.precision_plugin), id(strategy.model),
               id(trainer.profiler), id(optimizer), tuple(map(id, trainer.callbacks)))  # type: ignore[attr-defined]
        if key != self._plan_key:
            self._plan_key, self._cached_plan = key, _plan(trainer, optimizer)
        return self._cached_plan

    def run(self, optimizer: Optimizer, batch_idx: int, kwargs: OrderedDict) -> dict[str, Any]:
        trainer = self.trainer
        plan = self._plan_for(optimizer)
        if plan is None or self._skip_backward or trainer.accumulate_grad_batches != 1:
            return super().run(optimizer, batch_idx, kwargs)
        self.direct_steps += 1
        module = plan.module
        progress = self.optim_progress.optimizer
        results: list[ClosureResult] = []

        def closure() -> torch.Tensor | None:
            with torch.enable_grad():
                results.append(self._closure(plan, optimizer, batch_idx, kwargs))
            self._before_optimizer_step(plan, optimizer)
            return results[-1].loss

        progress.step.increment_ready()
        previous = module._current_fx_name
        module._current_fx_name = "optimizer_step"
        optimizer.step(closure=closure)  # type: ignore[arg-type]  # torch types closures as returning float
        module._current_fx_name = previous
        progress.step.increment_completed()
        if not results:
            raise MisconfigurationException(
                f"{type(optimizer).__name__}.step(closure) returned without calling the closure, so no training_step "
                "ran: automatic optimization needs an optimizer that calls it (or set "
                f"{ENV_SWITCH}=0 to see Lightning's own handling)")
        result = results[-1]
        return {} if result.loss is None else result.asdict()

    def _closure(self, plan: _Plan, optimizer: Optimizer, batch_idx: int, kwargs: OrderedDict) -> ClosureResult:
        """training_step, zero_grad and backward with their hooks, as Lightning's Closure runs them."""
        trainer, module = self.trainer, plan.module
        module._current_fx_name = "training_step"
        with trainer.precision_plugin.train_step_context():
            output = module.training_step(*kwargs.values())
        # a bare loss needs none of from_training_step_output's checks, nor its division by the accumulation
        # factor, 1 here: x / 1 is x, and its gradient g * 1 is g, bit for bit, so only an op and a graph node go
        result = (ClosureResult(output) if type(output) is torch.Tensor
                  else ClosureResult.from_training_step_output(output, 1))
        loss = result.closure_loss
        if loss is None:
            _warnings.warn("`training_step` returned `None`. If this was on purpose, ignore this warning...")
        progress = self.optim_progress.optimizer.zero_grad
        progress.increment_ready()
        self._hook(plan, "on_before_zero_grad", optimizer)
        progress.increment_started()
        module._current_fx_name = "optimizer_zero_grad"
        module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        progress.increment_completed()
        if loss is not None:
            self._hook(plan, "on_before_backward", loss)
            module._current_fx_name = "backward"
            module.backward(loss)
            self._hook(plan, "on_after_backward")
        module._current_fx_name = "optimizer_step"
        return result

    def _before_optimizer_step(self, plan: _Plan, optimizer: Optimizer) -> None:
        """What the precision plugin runs between the closure and the optimizer's update: hook, then clipping."""
        trainer, module = self.trainer, plan.module
        self._hook(plan, "on_before_optimizer_step", optimizer)
        if plan.clipping_overridden or trainer.gradient_clip_val:
            module._current_fx_name = "configure_gradient_clipping"
            module.configure_gradient_clipping(optimizer, gradient_clip_val=trainer.gradient_clip_val,
                                               gradient_clip_algorithm=trainer.gradient_clip_algorithm)
        module._current_fx_name = "optimizer_step"

    def _hook(self, plan: _Plan, hook: str, *args: Any) -> None:
        """A hook for the callbacks that override it, then for the module where it does, under the hook's name."""
        callbacks, own = plan.callback_hooks[hook], plan.module_hooks[hook]
        if not callbacks and own is None:
            return
        module = plan.module
        module._current_fx_name = hook
        for fn in callbacks:
            fn(self.trainer, module, *args)
        if own is not None:
            own(*args)


def install(trainer: Trainer) -> None:
    """Run the trainer's automatic optimization through :class:`DirectOptimization` (state carried over).

    Only Lightning's own loop class is replaced; a subclass someone installed is theirs and is left alone."""
    epoch_loop = trainer.fit_loop.epoch_loop
    loop = epoch_loop.automatic_optimization
    if type(loop) is not _AutomaticOptimization or not enabled():
        return
    direct = DirectOptimization(trainer)
    direct.__dict__.update(vars(loop))  # its progress counters (checkpointed under the same name) and loop state
    epoch_loop.automatic_optimization = direct
