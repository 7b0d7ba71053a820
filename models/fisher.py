"""Empirical Fisher sensitivities of a torch causal LM, saved as an npz side file for FGMP.

The only lowbit module besides the model adapters that imports torch. For every ``nn.Linear``
(including a tied ``lm_head``) it accumulates, over the calibration windows:

- ``weight/<module path>``: sum over windows of (dL/dW)^2, the diagonal empirical Fisher of the
  language-model loss L (mean next-token cross-entropy of one window), shape **[out, in]** (torch
  orientation; the ONNX pass transposes it for exports that store W as [in, out]);
- ``act/<module path>``: sum over windows and tokens of (dL/dx)^2 per input channel, shape [in]
  (the Fisher of the activation at the linear's input; siblings sharing an input get the same
  vector because the hook sees the shared tensor's total gradient).

Keys are torch module paths, which are exactly lowbit's ONNX site names (``LinearSite.name``),
so the ONNX precision pass looks them up without knowing torch. Per-window squared gradients (not
the squared mean gradient) make this the empirical Fisher over windows; only relative values
matter to FGMP, which ranks blocks globally.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.files.fsutil import atomic_path
from lowbit.core.fisher_file import ACT_PREFIX, WEIGHT_PREFIX
from lowbit.errors import LowbitError
from lowbit.files.paths import cache_root

__all__ = ["ACT_PREFIX", "WEIGHT_PREFIX", "empirical_fisher", "save_fisher", "shipped_fisher_provider"]

logger = logging.getLogger(__name__)



def empirical_fisher(model: Any, windows: np.ndarray, *, progress: bool = True) -> dict[str, np.ndarray]:
    """{"weight/<site>": [out, in], "act/<site>": [in]} float32 Fisher diagonals (see module doc).

    ``model``: a torch causal LM returning ``.logits``; ``windows``: int64 token ids [N, T].
    """
    import torch
    from tqdm.auto import tqdm

    windows = np.asarray(windows, np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise LowbitError(f"Fisher windows must be [N, T >= 2] token ids, got shape {windows.shape}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if not linears:
        raise LowbitError("the torch model has no nn.Linear modules to compute sensitivities for")
    w_acc = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in linears.items()}
    a_acc = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(_act_hook(n, a_acc)) for n, m in linears.items()]
    model.eval()
    try:
        for row in tqdm(windows, desc="empirical Fisher", unit="window", disable=None if progress else True, leave=False):
            ids = torch.from_numpy(row[None, :])
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
            loss.backward()
            for n, m in linears.items():
                w_acc[n] += m.weight.grad.double() ** 2
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    out = {f"{WEIGHT_PREFIX}{n}": w_acc[n].float().numpy() for n in linears}
    out.update({f"{ACT_PREFIX}{n}": a_acc[n].float().numpy() for n in linears})
    return out


def _act_hook(name: str, acc: dict):
    def hook(_module, args):
        x = args[0]
        if x.requires_grad:
            x.register_hook(grad_hook)  # the gradient w.r.t. the input is only known in backward

    def grad_hook(g):
        acc[name].add_((g.double() ** 2).reshape(-1, g.shape[-1]).sum(0))
        return None  # a tensor hook's return value would replace the gradient

    return hook


def save_fisher(fisher: dict[str, np.ndarray], path: str | Path, *, source: str) -> Path:
    """Write the Fisher dict as an npz (atomically); ``source`` is recorded under ``meta/source``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **fisher, **{"meta/source": np.array(source)})
    return path


def shipped_fisher_provider(source: str, windows: Sequence[np.ndarray]) -> Callable[[], Path | None]:
    """A memoized provider of the Fisher side file for ``source`` on ``windows``: for a shipped
    model name (or a lowbit dynamo export directory of one) the cached npz under
    ``$LOWBIT_CACHE/fisher``, computed with torch on first use; None for anything else. The
    windows are read only when asked (an encoder's padded batches of other lengths never are)."""
    found: list[Path | None] = []

    def provide() -> Path | None:
        if not found:
            found.append(_shipped_fisher(source, windows))
        return found[0]

    return provide


def _shipped_fisher(source: str, windows: Sequence[np.ndarray]) -> Path | None:
    from lowbit.models.registry import SHIPPED

    name = _torch_source(source)
    if name not in SHIPPED or len(windows) == 0 or len({np.shape(w) for w in windows}) != 1:
        return None  # not a shipped causal LM's token windows (an encoder's batches vary in length)
    windows = np.stack(windows)
    digest = hashlib.sha256(np.ascontiguousarray(windows, np.int64).tobytes()).hexdigest()[:16]
    path = cache_root() / "fisher" / f"{name}-{digest}.npz"
    if not path.is_file():
        from lowbit.models.registry import load_torch_model, resolve_model

        logger.info("computing the empirical Fisher of %s on %d windows (torch)", name, len(windows))
        torch_model = load_torch_model(resolve_model(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        fisher = empirical_fisher(torch_model, windows)
        save_fisher(fisher, path, source=f"empirical Fisher (torch autograd) of {name} on "
                                         f"{windows.shape[0]}x{windows.shape[1]} calibration tokens")  # fmt: skip
    return path


def _torch_source(label: str) -> str:
    """The shipped model behind an input: its name, or the source recorded in a lowbit export
    directory (``lowbit_export.json``, dynamo exports only: their site names are torch paths)."""
    meta = Path(label) / "lowbit_export.json" if label else None
    if meta is not None and meta.is_file():
        info = json.loads(meta.read_text())
        return str(info.get("model", "")) if not info.get("with_past") else ""
    return label
