"""Slice context (2.5D): the one rule for the order of a network's input channels. Each modality comes with its own
slice and its K neighbours on each side, as the channels ``m[-K] ... m[-1], m, m[+1] ... m[+K]``, modality after
modality. Training rows (stored neighbours, ``builder.format.context_offsets``), whole volumes, exports and pictures
all go through these functions, so that a model meets its inputs in the order it was trained on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from builder.format import context_offsets


def neighbours_kept(stored: int, wanted: int) -> slice:
    """Which of a row's ``2 * stored`` stored neighbouring slices (``context_offsets(stored)``) a run with ``wanted``
    on each side reads: the ``wanted`` nearest on each side, in the same order."""
    return slice(stored - wanted, stored + wanted)


def stack_context(own: np.ndarray, neighbours: np.ndarray | None, context: int) -> np.ndarray:
    """(..., C, H, W) slices and their (..., C, 2K, H, W) neighbours (in ``context_offsets(K)`` order) as the
    network's (..., C * (2K + 1), H, W) input channels: each channel's slices in order, from ``-K`` to ``+K``."""
    if not context:
        return own
    assert neighbours is not None
    stacked = np.concatenate([neighbours[..., :context, :, :], own[..., None, :, :], neighbours[..., context:, :, :]],
                             axis=-3)
    return stacked.reshape(*own.shape[:-3], -1, *own.shape[-2:])


def volume_inputs(stack: np.ndarray, indices: np.ndarray, context: int) -> np.ndarray:
    """Network inputs for slices ``indices`` of a (C, H, W, S) stack of whole volumes: (len(indices), C * (2K + 1),
    H, W), zeros beyond the volume's edges, as the builder stores the neighbours of a row near an edge."""
    own = np.moveaxis(stack[..., indices], -1, 0)  # (n, C, H, W)
    if not context:
        return np.ascontiguousarray(own)
    at = indices[:, None] + np.array(context_offsets(context))[None, :]  # (n, 2K)
    inside = (at >= 0) & (at < stack.shape[-1])
    gathered = stack[..., np.clip(at, 0, stack.shape[-1] - 1)] * inside  # (C, H, W, n, 2K)
    return np.ascontiguousarray(stack_context(own, gathered.transpose(3, 0, 4, 1, 2), context))


def input_names(channels: Sequence[str], context: int) -> list[str]:
    """The network's input channels by name, in order: ``t1n[-1]``, ``t1n``, ``t1n[+1]``, ``t1c[-1]``, ..."""
    return [f"{channel}[{offset:+d}]" if offset else channel for channel in channels
            for offset in range(-context, context + 1)]


def own_slice(channel: int, context: int) -> int:
    """The input channel that holds channel ``channel``'s own slice (not a neighbour)."""
    return channel * (2 * context + 1) + context
