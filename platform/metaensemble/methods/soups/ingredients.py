"""Soup ingredients: the checks before any work, and the uniform average of state dicts.

    check_ingredients(states, model, parents)   # CheckpointError naming what differs
    state = average(states)                     # float tensors averaged; counters: the first's
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn

from metaensemble.errors import CheckpointError

State = dict[str, torch.Tensor]
COUNTERS = ("num_batches_tracked",)
"""Integer buffers that count training steps: they may differ between ingredients (the
soup takes the first's; the statistics they count are recomputed anyway). Every other
integer tensor (an index, a mask) must be equal in all ingredients."""


def check_ingredients(states: Sequence[State], model: nn.Module,
                      parents: Sequence[Hashable | None] | None = None) -> None:
    """Raise one CheckpointError unless ``states`` can be averaged into ``model``: at
    least one, each with exactly ``model``'s tensor names and shapes, equal integer
    tensors besides COUNTERS, and (when ``parents`` is given, one entry per ingredient:
    a parent run id, checkpoint or init seed; None for unknown) one parent for all: a
    known parent and an unknown one differ, while all unknown passes (only the
    architecture is checked then)."""
    if not states:
        raise CheckpointError("a soup needs at least one ingredient; got none")
    ref = {k: (tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict().items()}
    problems = [f"ingredient {i}: {d}" for i, s in enumerate(states) if (d := _differences(s, ref))]
    if problems:
        raise CheckpointError(
            f"soup ingredients do not all match the architecture given ({len(ref)} tensors): "
            f"{'; '.join(problems)}. Every ingredient must be a state dict of that architecture "
            f"with the same widths (the same registry name and kwargs)")
    _check_fixed_tensors(states)
    if parents is not None:
        _check_parents(parents, len(states))


def _differences(state: State, ref: dict[str, tuple[tuple[int, ...], bool]]) -> str:
    """What ``state`` lacks, adds or reshapes against ``ref`` (name -> (shape, is_float)); '' if nothing."""
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    changed = [f"{k} {tuple(state[k].shape)} vs {ref[k][0]}" for k in ref
               if k in state and (tuple(state[k].shape), state[k].is_floating_point()) != ref[k]]
    parts = [f"{label} {len(ks)}: {', '.join(ks)}"
             for label, ks in (("missing", missing), ("unexpected", extra), ("shape or dtype kind differs", changed)) if ks]
    return ", ".join(parts)


def _check_fixed_tensors(states: Sequence[State]) -> None:
    """Integer tensors other than COUNTERS must be equal: an index or a mask has no average."""
    first = states[0]
    fixed = [k for k, v in first.items() if not v.is_floating_point() and k.rpartition(".")[2] not in COUNTERS]
    differ = [f"{k} (ingredient {i})" for k in fixed for i, s in enumerate(states[1:], 1)
              if not torch.equal(s[k].cpu(), first[k].cpu())]
    if differ:
        raise CheckpointError(f"integer tensors differ from ingredient 0's and cannot be averaged: "
                              f"{', '.join(differ)}; ingredients must share every index and mask buffer")


def _check_parents(parents: Sequence[Hashable | None], k: int) -> None:
    if len(parents) != k:
        raise ValueError(f"parents names {len(parents)} ingredients' parents, but there are {k} ingredients")
    by: dict[Hashable | None, list[int]] = {}
    for i, p in enumerate(parents):
        by.setdefault(p, []).append(i)
    if len(by) > 1:
        seen = "; ".join(f"{'unknown' if p is None else repr(p)}: ingredients {', '.join(map(str, ix))}"
                         for p, ix in by.items())
        raise CheckpointError(
            f"soup ingredients come from different parents ({seen}); networks trained from different "
            f"parents or inits are not averageable: give ingredients fine-tuned from one parent")


def average(states: Sequence[State]) -> State:
    """The uniform average of ``states`` (checked): float tensors averaged in float32 and
    cast back to the first's dtype; integer tensors (counters included) the first's."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = torch.stack([s[k].detach().to(v.device, torch.float32) for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = v.detach().clone()
    return out
