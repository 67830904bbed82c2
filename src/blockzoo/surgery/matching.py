"""Where an edit applies: the modules ``where`` selects, and the probe passes that measure them.

Matching sees the modules :func:`~blockzoo.blocks.base.named_open_modules` lists (not the insides
of atomic blockzoo blocks nor of surgery's wrappers). A module used at several places (shared,
tied weights) is one :class:`Target` with every path it has; selecting any of its paths selects
it, and its replacement is put at every path, so the weights stay tied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_state

from ..blocks.base import named_open_modules
from ..core.validation import close_matches

Where = Callable[[str, nn.Module], bool] | str | Iterable[str] | None


@dataclass
class Target:
    """A matched module and every path at which the model uses it (first path first)."""

    module: nn.Module
    paths: list[str]

    @property
    def name(self) -> str:
        return self.paths[0]


def _refuse_scripted(operation: str, model: nn.Module) -> None:
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        what = "the model" if scripted[0] == "" else f"{scripted[0]!r}"
        raise ValueError(
            f"{operation}: {what} is a TorchScript module (torch.jit.script or torch.jit.trace), "
            f"whose compiled code cannot be edited; edit the eager nn.Module, then script or trace "
            f"it again"
        )


def _matcher(where: Where, names: list[str]) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, module: True
    if callable(where):
        return where
    wanted = {where} if isinstance(where, str) else set(where)
    missing = sorted(wanted - set(names))
    if missing:
        raise ValueError(
            f"no module named {', '.join(map(repr, missing))} in the model"
            f"{close_matches(missing[0], names)}"
        )
    return lambda name, module: name in wanted


def find_targets(
    operation: str, model: nn.Module, where: Where, of_type: type[nn.Module] = nn.Module
) -> list[Target]:
    """The modules ``where`` selects, each once with all its paths, in the model's order.

    A predicate ``where`` is asked only about modules of ``of_type``; a module named explicitly
    is returned whatever its type.

    A scripted or traced model is refused. A shared module that is also used inside an atomic
    block (where it cannot be replaced) is refused, naming all its paths.
    """
    _refuse_scripted(operation, model)
    found = named_open_modules(model)
    match = _matcher(where, [name for name, _ in found])
    groups: dict[int, Target] = {}
    for name, module in found:
        groups.setdefault(id(module), Target(module, [])).paths.append(name)
    targets = [
        t for t in groups.values()
        if (isinstance(t.module, of_type) or not callable(where))
        and any(match(p, t.module) for p in t.paths)
    ]
    uses: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        uses.setdefault(id(module), []).append(name)
    for t in targets:
        hidden = [p for p in uses[id(t.module)] if p not in t.paths]
        if hidden:
            raise ValueError(
                f"{operation}: {t.name} is also used as {', '.join(hidden)}, inside a block that "
                f"surgery does not edit; editing it would untie the weights (it is used at "
                f"{', '.join(uses[id(t.module)])})"
            )
    return targets


def put(model: nn.Module, edits: Iterable[tuple[list[str], nn.Module]]) -> Callable[[], None]:
    """Set each new module at each of its paths (qualified names) of ``model``, deepest paths
    first, so that a wrapper of a module wraps it with its own edits done; returns the function
    that puts the old modules back (a dry run counts the edited model, then undoes it)."""
    placed = sorted(((path, new) for paths, new in edits for path in paths),
                    key=lambda item: -item[0].count("."))
    undo = []
    for path, new in placed:
        parent_name, _, key = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        undo.append((parent, key, parent._modules[key]))
        setattr(parent, key, new)

    def restore() -> None:
        for parent, key, old in reversed(undo):
            setattr(parent, key, old)

    return restore


def placement(module: nn.Module, model: nn.Module) -> dict[str, Any]:
    """``device``/``dtype`` of the module's first tensor (else the model's), for a new block."""
    for source in (module, model):
        for tensor in (*source.parameters(), *source.buffers()):
            if tensor.is_floating_point():
                return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def random_input(
    channels: int, h: int, w: int, device: torch.device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """A fixed random ``(2, channels, h, w)`` test input that leaves the global RNG alone."""
    gen = torch.Generator(device=device or "cpu").manual_seed(0)
    return torch.randn(2, channels, h, w, generator=gen, device=device, dtype=dtype)


#: Hook tables a probe pass leaves out: the modules' own and the global ones.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")
_GLOBAL_HOOK_TABLES = ("_global_forward_pre_hooks", "_global_forward_hooks")


@contextmanager
def probing(*modules: nn.Module) -> Iterator[None]:
    """Run a measuring forward pass: eval mode, no autograd, none of the user's forward hooks.

    Every submodule's ``training`` flag and hook table is restored afterwards (hooks registered
    inside the block are dropped), so the probe neither changes the model nor fires its hooks.
    """
    subs = list({id(m): m for root in modules for m in root.modules()}.values())
    modes = [m.training for m in subs]
    tables = [getattr(m, t) for m in subs for t in _HOOK_TABLES]
    tables += [getattr(_module_state, t) for t in _GLOBAL_HOOK_TABLES]
    saved = [list(table.items()) for table in tables]
    for table in tables:
        table.clear()
    try:
        for m in subs:
            m.training = False
        with torch.no_grad():
            yield
    finally:
        for table, items in zip(tables, saved, strict=True):
            table.clear()
            table.update(items)
        for m, mode in zip(subs, modes, strict=True):
            m.training = mode
