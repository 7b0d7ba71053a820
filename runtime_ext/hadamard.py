"""Hadamard matrices of the sizes transformer widths take, and the orthogonal rotations built on
them (pure numpy; the matrices behind the ``Hadamard`` op and the offline rotation passes).

A Hadamard matrix H of order n has entries +-1 and ``H @ H.T == n * I``; ``H / sqrt(n)`` is
orthogonal and spreads every coordinate of a vector over all n outputs, which is what makes an
outlier channel harmless to a quantizer. Widths are rarely powers of two (SmolLM2: 576 = 9 x 64,
1536 = 3 x 512), so an order n = c * 2^k is built as the Kronecker product ``H_c (x) H_{2^k}``
(QuaRot does the same) with a *base* H_c from one of:

- Sylvester (scipy.linalg.hadamard): c = 1, any power of two;
- Paley I: c = q + 1 for a prime q = 3 (mod 4) (12, 20, 24, 32, 44, 48, 60, 72, 84, ...);
- Paley II: c = 2 (q + 1) for a prime q = 1 (mod 4) (12, 28, 36, 60, 76, ...).

The smallest base that divides n with a power-of-two cofactor is used. 576 has none of order
9 or 18 (no Hadamard matrix of odd order > 1 exists, and 18 = 2 (8 + 1) with 8 not prime) and
gets ``H_36 (x) H_16`` with H_36 from Paley II over GF(17). Orders with no such factorisation
(a width like 5 * 2^k with 20 not dividing it) have no Hadamard matrix here: :func:`rotation`
then falls back to a random orthogonal matrix (QR of a Gaussian matrix; it spreads outliers
about as well but has no fast transform) and says so in its ``kind``.

Guarantees: integer matrices exactly satisfy ``H @ H.T == n * I`` (tested for every order the
constructions reach up to 2^14); :func:`rotation` is orthogonal to float64 rounding.
"""

from __future__ import annotations

__all__ = ["Rotation", "hadamard", "hadamard_base", "hadamard_factors", "rotation"]

import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = legendre(j - i mod q): 0 on the diagonal, +1 for quadratic residues, -1 else."""
    residues = np.zeros(q, np.int64)
    residues[(np.arange(1, q) ** 2) % q] = 1
    chi = np.where(residues == 1, 1, -1)
    chi[0] = 0
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q prime = 3 mod 4: I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1), q prime = 1 mod 4: C = [[0, 1^T], [1, Q]] symmetric, each 0 replaced by
    [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]], np.int64)
    one = np.array([[1, 1], [1, -1]], np.int64)
    return np.kron(c, one) + np.kron((c == 0).astype(np.int64), zero)


def _base(c: int) -> np.ndarray | None:
    if c == 1:
        return np.ones((1, 1), np.int64)
    if _is_prime(c - 1) and (c - 1) % 4 == 3:
        return _paley1(c - 1)
    if c % 2 == 0 and _is_prime(c // 2 - 1) and (c // 2 - 1) % 4 == 1:
        return _paley2(c // 2 - 1)
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(c, 2^k) with n = c * 2^k and a base Hadamard matrix of order c, the smallest c; None if
    no construction here reaches n."""
    if n < 1:
        return None
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    for j in range(twos + 1):
        c = odd << j
        if _base(c) is not None:
            return c, n // c
    return None


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> np.ndarray | None:
    factors = hadamard_factors(n)
    if factors is None:
        return None
    c, p = factors
    h = np.kron(_base(c), scipy.linalg.hadamard(p, dtype=np.int64)) if c > 1 else scipy.linalg.hadamard(p, dtype=np.int64)
    h.setflags(write=False)
    return h


def hadamard(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order n (int64, read-only), or ValueError if none is built here."""
    h = _hadamard(int(n))
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} here (n = c * 2^k needs a Paley or Sylvester base c)")
    return h


def hadamard_base(n: int) -> np.ndarray:
    """float32 H_c / sqrt(c), the base of the order-n matrix (n = c * 2^k): the ``Hadamard`` op's
    second input, which its kernel and fallback combine with a Walsh-Hadamard transform of 2^k."""
    c = hadamard_factors(n)
    if c is None:
        raise ValueError(f"no Hadamard matrix of order {n} here")
    return (hadamard(c[0]) / np.sqrt(c[0])).astype(np.float32)


@dataclass(frozen=True)
class Rotation:
    """An n x n orthogonal matrix Q and how it was made. A Hadamard rotation, ``diag(s) (H_c (x)
    H_2^k) / sqrt(n)``, is applied to a matrix by a fast Walsh-Hadamard transform over the 2^k
    factor and one small GEMM by H_c (:meth:`right`, :meth:`left_t`): O(n (c + log n)) per row
    instead of the dense product's O(n^2), which is what makes rotating an 8B model's weights take
    a minute instead of most of an hour. ``matrix`` is the dense form, built on first use."""

    n: int
    kind: str  # "hadamard c x 2^k" | "random orthogonal"
    factors: tuple[int, int] | None = None  # (c, 2^k) of a Hadamard rotation
    signs: np.ndarray | None = None  # s, one +-1 per row of H (None: plain H / sqrt(n))
    dense: np.ndarray | None = None  # the random orthogonal matrix

    @functools.cached_property
    def matrix(self) -> np.ndarray:
        """Q, float64 [n, n]."""
        if self.dense is not None:
            return self.dense
        h = hadamard(self.n) / np.sqrt(self.n)
        return h if self.signs is None else self.signs[:, None] * h

    def right(self, x: np.ndarray) -> np.ndarray:
        """``x @ Q`` over the last axis of ``x`` (float64 result)."""
        x = np.asarray(x, np.float64)
        if self.factors is None:
            return x @ self.dense
        y = x * self.signs if self.signs is not None else x
        rows = y.reshape(-1, self.n)
        for factor, after in self._factors():  # contract the axis of size len(factor)
            if after == 1:  # the innermost axis: one GEMM
                rows = rows.reshape(-1, len(factor)) @ factor
            else:
                rows = np.matmul(factor.T, rows.reshape(-1, len(factor), after))
        return (rows / np.sqrt(self.n)).reshape(x.shape)

    def left_t(self, w: np.ndarray) -> np.ndarray:
        """``Q^T @ w`` over the first axis of a 2-D ``w`` (float64 result)."""
        w = np.asarray(w, np.float64)
        if self.factors is None:
            return self.dense.T @ w
        y = w * self.signs[:, None] if self.signs is not None else w
        cols = y.shape[1]
        for factor, after in self._factors():
            y = np.matmul(factor.T, y.reshape(-1, len(factor), after * cols))
        return (y / np.sqrt(self.n)).reshape(w.shape)

    def _factors(self) -> list[tuple[np.ndarray, int]]:
        """H = H_c (x) H_a (x) H_b (H_2^k = H_a (x) H_b, Sylvester, a ~ b ~ 2^(k/2)), innermost first:
        each factor with the number of elements after its axis. Contracting one small factor at a
        time costs n (a + b + c) per row instead of n^2, as a few batched GEMMs."""
        c, p = self.factors
        k = p.bit_length() - 1
        a, b = 1 << (k // 2), 1 << (k - k // 2)
        parts = [(_sylvester(b), 1), (_sylvester(a), b)]
        if c > 1:
            parts.append((_base(c).astype(np.float64), p))
        return [(f, after) for f, after in parts if len(f) > 1]


@functools.lru_cache(maxsize=16)
def _sylvester(p: int) -> np.ndarray:
    return scipy.linalg.hadamard(p).astype(np.float64)


def rotation(n: int, seed: int | None = 0, *, signs: bool = True) -> Rotation:
    """``diag(s) @ H / sqrt(n)`` with random signs s (QuaRot's randomized Hadamard; ``signs=False``
    or ``seed=None``: plain H / sqrt(n)), or a random orthogonal matrix where no Hadamard matrix of
    order n is built here."""
    rng = np.random.default_rng(seed)
    factors = hadamard_factors(n)
    if factors is None:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return Rotation(n, "random orthogonal", dense=q * np.sign(np.diag(r))[None, :])
    s = rng.choice([-1.0, 1.0], size=n) if signs and seed is not None else None
    return Rotation(n, f"hadamard {factors[0]} x {factors[1]}", factors=factors, signs=s)
