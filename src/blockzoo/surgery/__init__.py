"""Model surgery: put blockzoo blocks into an existing network, keeping what it computes.

Three edits answer "where do I put the block?":

- :func:`replace_convs` swaps matching ``nn.Conv2d`` modules for a conv-kind block with the same
  input and output channels, stride, kernel size, dilation and groups;
- :func:`insert_after` / :func:`insert_before` wrap matching modules as
  ``Sequential(module, block)`` / ``Sequential(block, module)``, with the block's channel count
  inferred from the module (or from a probe forward pass).

With ``preserve=True`` (the default) the edited network computes the same function as before at
the moment of the edit, so a pretrained model keeps its accuracy until fine-tuning starts:

- a replaced conv's weights are copied into the new block by the block's own
  ``init_from_conv`` (every expert of a dynamic conv is the old kernel; a deformable conv has
  zero offsets; ...), and the result is checked numerically against the old conv before the
  model is touched; blocks that cannot represent an arbitrary dense convolution raise a
  ``ValueError`` that says why (their class's ``conv_preservation``);
- an inserted block that is the identity when fresh (global context) is inserted as it is; any
  other block is inserted as a :class:`GatedResidual` ``x + gamma * (block(x) - x)`` with
  ``gamma = 0``, a learnable scalar.

A module used at several places (shared, tied weights) is edited once and the result put at every
place. Every edit returns a :class:`SurgeryReport`; ``dry_run=True`` builds and checks everything
and reports what would change without changing the model. State-dict keys of wrapped modules
change (``layer1.0.bn2.weight`` becomes ``layer1.0.bn2.0.weight``): load pretrained weights
before the edit, which is what function preservation is for.

Layout: :mod:`.matching` (which modules ``where`` selects, the probe passes), :mod:`.replace`
(:func:`replace_convs`), :mod:`.insert` (:func:`insert_after`, :func:`insert_before`,
:class:`GatedResidual`), :mod:`.report` (:class:`SurgeryReport`, :class:`Change`).
"""

from __future__ import annotations

from .insert import GatedResidual, insert_after, insert_before
from .matching import Where
from .replace import CONV_KINDS, NOT_PRESERVABLE, preservable_convs, replace_convs
from .report import Change, SurgeryReport

__all__ = [
    "CONV_KINDS",
    "NOT_PRESERVABLE",
    "Change",
    "GatedResidual",
    "SurgeryReport",
    "Where",
    "insert_after",
    "insert_before",
    "preservable_convs",
    "replace_convs",
]
