"""Empirical Fisher from torch (lowbit.models.fisher) on a tiny causal LM, checked against
per-window gradients computed by hand; and the npz side file round trip."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.core.fisher_file import load_fisher
from lowbit.models.fisher import empirical_fisher, save_fisher


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.up = torch.nn.Linear(8, 12, bias=False)
        self.lm_head = torch.nn.Linear(12, 11, bias=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(torch.tanh(self.up(self.embed(input_ids)))))


def _by_hand(model: _TinyLM, windows: np.ndarray):
    w2 = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in (("up", model.up.weight), ("lm_head", model.lm_head.weight))}
    a2 = {"up": torch.zeros(8, dtype=torch.float64), "lm_head": torch.zeros(12, dtype=torch.float64)}
    for row in windows:
        ids = torch.from_numpy(row[None, :])
        model.zero_grad()
        x_up = model.embed(ids).detach().requires_grad_(True)
        h = torch.tanh(model.up(x_up))
        h.retain_grad()
        loss = torch.nn.functional.cross_entropy(model.lm_head(h)[0, :-1], ids[0, 1:])
        loss.backward()
        for n, m in (("up", model.up), ("lm_head", model.lm_head)):
            w2[n] += m.weight.grad.double() ** 2
        a2["up"] += (x_up.grad.double() ** 2).reshape(-1, 8).sum(0)
        a2["lm_head"] += (h.grad.double() ** 2).reshape(-1, 12).sum(0)
    return w2, a2


def test_empirical_fisher_matches_per_window_squared_gradients():
    model = _TinyLM()
    windows = np.random.default_rng(0).integers(0, 11, (3, 7)).astype(np.int64)
    fisher = empirical_fisher(model, windows, progress=False)
    assert set(fisher) == {"weight/up", "weight/lm_head", "act/up", "act/lm_head"}
    assert all(p.grad is None for p in model.parameters())  # leaves the model clean
    w2, a2 = _by_hand(model, windows)
    assert fisher["weight/up"].shape == (12, 8)  # torch orientation [out, in]
    for n in ("up", "lm_head"):
        np.testing.assert_allclose(fisher[f"weight/{n}"], w2[n].numpy(), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(fisher[f"act/{n}"], a2[n].numpy(), rtol=1e-5, atol=1e-12)
    with pytest.raises(LowbitError, match="windows"):
        empirical_fisher(model, windows[0], progress=False)


def test_side_file_round_trip(tmp_path):
    data = {"weight/a.b": np.arange(6, dtype=np.float32).reshape(2, 3), "act/a.b": np.ones(3, np.float32)}
    path = save_fisher(data, tmp_path / "f.npz", source="unit test")
    loaded, source = load_fisher(path)
    assert source == "unit test" and set(loaded) == set(data)
    np.testing.assert_array_equal(loaded["weight/a.b"], data["weight/a.b"])
    save_fisher({"weight/x": np.array([-1.0], np.float32)}, tmp_path / "bad.npz", source="bad")
    with pytest.raises(LowbitError, match="negative"):
        load_fisher(tmp_path / "bad.npz")
    with pytest.raises(LowbitError, match="does not exist"):
        load_fisher(tmp_path / "missing.npz")
