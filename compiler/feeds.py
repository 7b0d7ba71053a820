"""Build ONNX Runtime feeds for a token window, whatever inputs an exported model declares.

Handles the torch-dynamo export (``input_ids`` [+ ``attention_mask``]), optimum KV-cache exports
(``attention_mask``, ``position_ids`` and empty ``past_key_values.N.key/value``), and BERT-style
encoders (``token_type_ids``). Unknown required inputs raise a LowbitError naming them.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["make_feed"]

_NP = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
       "tensor(float16)": np.float16, "tensor(bool)": np.bool_}  # fmt: skip


def _past_shape(arg, batch: int) -> list[int]:
    dims = []
    for i, d in enumerate(arg.shape):
        if isinstance(d, int):
            dims.append(d)
        elif i == 0:
            dims.append(batch)
        else:
            dims.append(0)  # the past sequence axis is the only symbolic one left
    return dims


def make_feed(session_inputs, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``ids``: int array [seq] or [batch, seq]. ``session_inputs``: ``InferenceSession.get_inputs()``."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    batch, seq = ids.shape
    feed: dict[str, np.ndarray] = {}
    for arg in session_inputs:
        name, dtype = arg.name, _NP.get(arg.type, np.float32)
        if name in ("input_ids", "input"):
            feed[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feed[name] = np.ones((batch, seq), dtype)
        elif name == "position_ids":
            feed[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif name == "token_type_ids":
            feed[name] = np.zeros((batch, seq), dtype)
        elif name.startswith("past_key_values") or name.startswith("past_"):
            feed[name] = np.zeros(_past_shape(arg, batch), dtype)
        else:
            raise LowbitError(f"model input {name!r} ({arg.type}) cannot be fed from token ids")
    return feed
