"""Build ONNX Runtime feeds for token ids, whatever inputs an exported model declares.

Handles the torch-dynamo export (``input_ids`` [+ ``attention_mask``]), optimum KV-cache exports
(``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` -- empty unless a past is
given), BERT-style encoders (``token_type_ids``) and image models (``pixel_values`` only). The one
feed builder of lowbit: calibration, verification, evaluation and benchmarks all use it. Unknown
inputs raise a LowbitError naming them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["build_feeds", "make_feed"]

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}  # fmt: skip


def build_feeds(session: Any, input_ids: np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`make_feed` for every input of ``session`` (anything with ``get_inputs()``)."""
    return make_feed(session.get_inputs(), input_ids, **kwargs)


def make_feed(inputs: Sequence[Any], input_ids: np.ndarray, *, attention_mask: np.ndarray | None = None,
              past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds for ``inputs`` (ORT NodeArgs) given token ids [T] or [B, T]; an empty KV cache
    unless ``past`` (keyed by input name) is given. A model whose one input is ``pixel_values``
    is fed the given array itself, which must be a batch of images [B, C, H, W]."""
    if len(inputs) == 1 and inputs[0].name == "pixel_values":
        if np.ndim(input_ids) != 4:
            raise LowbitError(f"model input 'pixel_values' is not one lowbit knows how to feed from an array of "
                              f"shape {np.shape(input_ids)}: it takes images [batch, channels, height, width]")
        return {"pixel_values": np.asarray(input_ids, _NP_TYPES.get(inputs[0].type, np.float32))}
    input_ids = np.atleast_2d(np.asarray(input_ids))
    batch, seq = input_ids.shape
    past = past or {}
    past_len = next((v.shape[2] for v in past.values()), 0)
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        dtype = _NP_TYPES.get(inp.type)
        if dtype is None:
            raise LowbitError(f"model input {inp.name!r} has unsupported type {inp.type}")
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids.astype(dtype)
        elif inp.name == "attention_mask":
            mask = attention_mask if attention_mask is not None else np.ones((batch, past_len + seq))
            feeds[inp.name] = mask.astype(dtype)
        elif inp.name == "token_type_ids":
            feeds[inp.name] = np.zeros((batch, seq), dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(dtype)
        elif inp.name.startswith("past_key_values."):
            if inp.name in past:
                feeds[inp.name] = past[inp.name]
            else:
                # [batch, kv_heads, past_len, head_dim]: heads and head_dim are static in exports.
                heads, head_dim = inp.shape[1], inp.shape[3]
                if not (isinstance(heads, int) and isinstance(head_dim, int)):
                    raise LowbitError(f"KV input {inp.name} has no static head dims: {inp.shape}")
                feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype)
        else:
            raise LowbitError(f"model input {inp.name!r} is not one lowbit knows how to feed")
    return feeds
