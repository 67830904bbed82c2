"""What an edit changed: :class:`Change` per edited module, :class:`SurgeryReport` per edit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.formatting import format_rows


def parameter_count(module: nn.Module) -> int:
    """Parameters of ``module``, each counted once however often it is used (tied weights)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Change:
    """One edited module: its qualified name, what it was, what it became, and the cost.

    A module used at several places (shared weights) is one change whose replacement stands at
    every place: ``name`` is the first, ``also_at`` the others.
    """

    name: str
    old: str
    new: str
    params_before: int
    params_after: int
    preservation: str
    also_at: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.name, *self.also_at)

    @property
    def param_delta(self) -> int:
        return self.params_after - self.params_before


@dataclass
class SurgeryReport:
    """What an edit changed (or, with ``dry_run``, would change) in a model.

    ``preservation`` of each change is ``"exact"`` (weights copied, checked numerically),
    ``"identity init"`` (a fresh block that is the identity), ``"gated residual"`` (wrapped in
    ``GatedResidual`` with ``gamma = 0``) or ``"none"`` (``preserve=False``). ``skipped`` lists
    ``(name, reason)`` for matched modules that could not be edited; ``notes`` what else the
    edit did (hooks moved to the new block, a block built without its own norm and activation).
    ``params_before`` and ``params_after`` count the model's parameters, each once.
    """

    operation: str
    block: str
    dry_run: bool
    params_before: int
    params_after: int = 0
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Every path that was edited (a shared module's every path)."""
        return [path for c in self.changes for path in c.paths]

    @property
    def param_delta(self) -> int:
        return self.params_after - self.params_before

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"module": " = ".join(c.paths), "was": c.old, "now": c.new, "params": c.param_delta,
             "preserved": c.preservation}
            for c in self.changes
        ]

    def __str__(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        head = (
            f"{self.operation}({self.block!r}) {verb} {len(self.changes)} module(s); parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.param_delta:+,})"
        )
        parts = [head]
        if self.changes:
            parts.append(format_rows(self.rows()))
        parts += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        parts += [f"note: {note}" for note in self.notes]
        return "\n".join(parts)
