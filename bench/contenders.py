"""All bench contenders, in table order: ONNX Runtime's quantizers (:mod:`lowbit.bench.peers`),
the peer tools in their own venvs (:mod:`lowbit.bench.peer_contenders`), then lowbit's recipes (:mod:`lowbit.bench.lowbit_contenders`). The registry itself is :mod:`lowbit.bench.contender`."""

from __future__ import annotations

# isort: off -- registration order is table order: the peers first
import lowbit.bench.peers  # noqa: F401
import lowbit.bench.peer_contenders  # noqa: F401
import lowbit.bench.lowbit_contenders  # noqa: F401
# isort: on
from lowbit.bench.contender import CONTENDERS, BuildContext, Contender, contenders_for, register, windows_cell

__all__ = ["BuildContext", "Contender", "CONTENDERS", "register", "contenders_for", "windows_cell"]
