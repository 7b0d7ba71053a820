"""Linear-site analysis: every MatMul/Gemm with a constant weight, and what feeds it.

Assumes a canonicalized graph (norms fused into single nodes, see ``canonicalize``). Read-only:
it never edits the graph. A *site* is a MatMul/Gemm whose weight operand is an initializer,
directly or through weight-layout ops (Transpose, Reshape, Identity, Cast) -- e.g. a tied lm_head
``MatMul(h, Transpose(embed_tokens.weight))``. For each site it records the reduction axis of the
stored initializer, the activation input, the sibling sites sharing that input (q/k/v, gate/up),
and the *feeder* that a scale or permutation can be folded into:

- ``norm``: a RMSNormalization / LayerNormalization node (gamma/beta absorb x/s);
- ``attention_v``: the input is attention output, linear in the v_proj output channels;
- ``gated_linear``: the input is ``act(gate) * up``, linear in the up_proj output channels;
- ``other``: anything else (reported, never folded into).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from lowbit.core.analyses import Key

__all__ = ["ELEMENTWISE_OPS", "FLOAT_SITE_KEY", "LINEAR_SITES", "Feeder", "LinearSite", "LinearSiteMap", "NORM_OPS",
           "POSITIVELY_HOMOGENEOUS_OPS", "find_linear_sites", "output_bias", "private_initializer", "selected_sites", "site_name"]

logger = logging.getLogger(__name__)

# Node metadata a pass sets on a MatMul it inserted that must stay float; the value is the reason
# the report shows for the skipped site.
FLOAT_SITE_KEY = "lowbit.float_site"
NORM_OPS = frozenset({("", "RMSNormalization"), ("", "LayerNormalization"), ("lowbit", "RMSNormalization")})
_WEIGHT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Cast"})
# Expand is GQA's repeat_kv: each kv channel is replicated to its query heads, so o_proj's input
# stays linear in v_proj's output channels (a folded scale must then agree across the replicas).
_ACT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Expand"})
# act(s * x) = s * act(x) for every s > 0: a positive per-channel scale (and any permutation)
# passes through unchanged, so a linear before the activation can absorb it
POSITIVELY_HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu"})
_WRAPPER_PREFIXES = ("inner.",)  # lowbit's export wrapper holds the HF model as `inner`


@dataclass
class Feeder:
    kind: str  # "norm" | "attention_v" | "gated_linear" | "activated_linear" | "other"
    node: ir.Node | None  # the norm node, the attention/matmul node, the gating Mul or the activation
    producer_site: LinearSite | None = None  # v_proj (attention_v), up_proj (gated_linear), fc1 (activated_linear)
    # a fused producer (Phi-3's gate_up_proj and qkv_proj, split on the last axis): the producer's output
    # columns this input is linear in (up, or V), and a fused gate_up's gate columns
    producer_columns: slice | None = None
    gate_columns: slice | None = None

    def describe(self) -> str:
        if self.kind == "norm":
            return f"norm {self.node.name}"
        if self.producer_site is not None:
            return f"{self.kind} of {self.producer_site.name}"
        return f"other ({self.node.op_type if self.node else 'graph input'})"


@dataclass
class LinearSite:
    node: ir.Node
    weight: ir.Value  # the initializer
    weight_path: tuple[ir.Node, ...]  # layout ops between the initializer and the node
    reduction_axis: int  # axis of the *stored* initializer that is contracted
    name: str
    feeder: Feeder | None = None
    siblings: list[LinearSite] = field(default_factory=list)

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def in_features(self) -> int:
        return int(self.weight.const_value.shape[self.reduction_axis])

    @property
    def out_features(self) -> int:
        return int(self.weight.const_value.shape[1 - self.reduction_axis])


def _trace_weight(value: ir.Value) -> tuple[ir.Value, tuple[ir.Node, ...]] | None:
    path: list[ir.Node] = []
    while value.const_value is None or not value.is_initializer():
        node = value.producer()
        if node is None or node.op_type not in _WEIGHT_LAYOUT_OPS or node.domain != "":
            return None
        path.append(node)
        value = node.inputs[0]
    return value, tuple(reversed(path))


def _reduction_axis(site_node: ir.Node, weight: ir.Value, path: tuple[ir.Node, ...]) -> int | None:
    """Axis of the 2-D stored initializer that the matmul contracts, or None if unsupported."""
    if weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    axis = 0  # MatMul(x, W): W is [K, N]
    if site_node.op_type == "Gemm" and site_node.attributes.get_int("transB", 0):
        axis = 1
    for node in reversed(path):  # undo layout ops from the node back to the initializer
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", [1, 0])
            axis = list(perm)[axis]
        elif node.op_type == "Reshape":
            return None  # reshaped weights: no stable channel axis
    return axis


def site_name(node: ir.Node, weight: ir.Value) -> str:
    """A stable, readable name: the torch module path when the exporter recorded it
    (``model.layers.0.self_attn.q_proj``), else the optimum node path or the weight name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    name = None
    if scopes:
        parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
        modules = [p for p in parts[:-1] if p]  # the last entry is the aten op itself
        name = modules[-1] if modules else None
    if name is None and node.name and node.name.startswith("/") and node.name.count("/") > 1:
        name = ".".join(node.name.strip("/").split("/")[:-1])
    if name is None and weight.name and not weight.name.startswith(("val_", "onnx::")):
        name = weight.name.removesuffix(".weight")
    name = name or node.name or weight.name or "linear"
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def private_initializer(value: ir.Value | None, users: int = 1) -> bool:
    """An initializer with a constant value and exactly ``users`` uses (a fold may rewrite it)."""
    return value is not None and value.is_initializer() and value.const_value is not None and len(value.uses()) == users


def _channel_bias(value: ir.Value | None, channels: int) -> bool:
    """A private constant of one value per output channel ([N] or [1, N])."""
    return private_initializer(value) and tuple(value.const_value.shape) in ((channels,), (1, channels))


def output_bias(site: LinearSite) -> ir.Value | str | None:
    """The constant added to each output channel of ``site`` -- Gemm's C, or the one ``Add`` that
    reads its output (Qwen's q/k/v_proj) -- so that a transform of the output channels (a folded
    scale, a permutation, a rotation per head) can be applied to it too; None when the output has
    no bias, a reason string when its constant is not a private per-channel bias."""
    n = site.out_features
    if site.node.op_type == "Gemm" and len(site.node.inputs) > 2 and site.node.inputs[2] is not None:
        c = site.node.inputs[2]
        return c if _channel_bias(c, n) else f"{site.name}: Gemm's C is not a private bias per output channel"
    out = site.node.outputs[0]
    users = out.consumers()
    if len(users) != 1 or users[0].op_type != "Add" or users[0].domain != "" or out.is_graph_output():
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other.const_value is None:
        return None  # a residual Add: not a bias
    return other if _channel_bias(other, n) else f"{site.name}: its output Add's constant is not a private bias per channel"


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _linear_behind(value: ir.Value) -> ir.Node | None:
    """The MatMul / Gemm whose output ``value`` is, directly or through layout ops that keep the
    last axis whole and a per-channel bias ``Add`` right after the linear (where
    :func:`output_bias` finds it; GPT-2's Conv1D: Gemm with C, then a Reshape back to [batch, seq,
    3 x hidden]), each value on the way read by the next step only -- so the linear's output
    columns are ``value``'s last axis, one to one."""
    while True:
        node = value.producer()
        if node is None or node.domain != "":
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return node
        if node.op_type == "Add":
            consts = [v for v in node.inputs if v is not None and v.const_value is not None]
            inner = [v for v in node.inputs if v is not None and v.const_value is None]
            width = _last_dim(value)
            if len(consts) != 1 or len(inner) != 1 or width is None or not _channel_bias(consts[0], width):
                return None
            source = inner[0]
            linear = source.producer()  # the bias right after the linear, where output_bias finds it
            if linear is None or linear.domain != "" or linear.op_type not in ("MatMul", "Gemm") or (
                    linear.op_type == "Gemm" and len(linear.inputs) > 2 and linear.inputs[2] is not None):
                return None
        elif node.op_type in _CHANNEL_KEEPING_OPS and _last_dim(node.inputs[0]) == _last_dim(value) is not None:
            source = node.inputs[0]
        else:
            return None
        if source.is_graph_output() or len(source.consumers()) != 1:
            return None
        value = source


_CHANNEL_KEEPING_OPS = frozenset({"Reshape", "Identity", "Squeeze", "Unsqueeze"})


def _last_dim(value: ir.Value) -> int | None:
    dims = tuple(value.shape) if value.shape is not None else ()
    return dims[-1] if dims and isinstance(dims[-1], int) else None


def _column_slice(value: ir.Value) -> tuple[ir.Value, slice] | None:
    """(the sliced value, its columns) when ``value`` is a constant Slice or Split of the last
    axis of a linear layer's output -- the MatMul's own, or behind a bias and channel-keeping
    layout ops (:func:`_linear_behind`)."""
    node = value.producer()
    if node is None or node.domain != "" or node.op_type not in ("Slice", "Split"):
        return None
    source = node.inputs[0]
    dims = tuple(source.shape) if source is not None and source.shape is not None else ()
    if not dims or not isinstance(dims[-1], int) or _linear_behind(source) is None:
        return None
    width, last = dims[-1], len(dims) - 1
    if node.op_type == "Split":
        if node.attributes.get_int("axis", 0) not in (-1, last):
            return None
        sizes = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is None:
            parts = len(node.outputs)
            sizes = [width // parts] * parts if width % parts == 0 else None
        if sizes is None or sum(sizes) != width:
            return None
        index = list(node.outputs).index(value)
        start = sum(sizes[:index])
        return source, slice(start, start + sizes[index])
    starts, ends = _constant_ints(node.inputs[1]), _constant_ints(node.inputs[2])
    axes = _constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = _constant_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, last) or steps != [1]:
        return None
    start, end = (max(0, min(width, v if v >= 0 else v + width)) for v in (starts[0], ends[0]))
    return (source, slice(start, end)) if end > start else None


def _computed_elementwise_from(value: ir.Value, source: ir.Value, depth: int = 8) -> bool:
    """``value`` is computed from ``source`` alone by elementwise ops (an activation: SiLU = x *
    Sigmoid(x), GELU's arithmetic) with scalar constants, so a permutation or positive scale of
    ``source``'s channels reaches ``value`` unchanged in kind."""
    if value is source:
        return True
    node = value.producer()
    if depth == 0 or node is None or node.domain != "" or node.op_type not in ELEMENTWISE_OPS:
        return False
    ins = [v for v in node.inputs if v is not None]
    if any(v.const_value is not None and v.const_value.size != 1 for v in ins):
        return False
    variable = [v for v in ins if v.const_value is None]
    return bool(variable) and all(_computed_elementwise_from(v, source, depth - 1) for v in variable)


# act(gate) as exporters write it: SiLU = x * Sigmoid(x), GELU via Erf/Tanh arithmetic
ELEMENTWISE_OPS = frozenset({"Sigmoid", "Mul", "Silu", "Gelu", "FastGelu", "Tanh", "Erf", "Div", "Add", "Relu",
                             "Softplus", "Pow"})  # fmt: skip


def _walk_up(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in _ACT_LAYOUT_OPS:
        node = node.inputs[0].producer()
    return node


class LinearSiteMap:
    """All linear sites of a graph, by node and by activation input."""

    def __init__(self, sites: list[LinearSite], skipped: dict[str, str] | None = None) -> None:
        self.sites = sites
        self.skipped = skipped or {}  # MatMul/Gemm with a constant weight we cannot treat: why
        self.by_node = {id(s.node): s for s in sites}
        self.groups: dict[int, list[LinearSite]] = {}
        for s in sites:
            self.groups.setdefault(id(s.input), []).append(s)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def restricted(self, nodes: set[ir.Node]) -> LinearSiteMap:
        """The sites whose node is in ``nodes`` (one block of a block-wise compile); feeders and
        skipped sites as found in the whole graph."""
        view = LinearSiteMap.__new__(LinearSiteMap)
        view.sites = [s for s in self.sites if s.node in nodes]
        view.skipped = self.skipped
        view.by_node = {id(s.node): s for s in view.sites}
        view.groups = {k: [s for s in g if s.node in nodes] for k, g in self.groups.items()}
        view.groups = {k: g for k, g in view.groups.items() if g}
        return view

    def input_groups(self) -> list[list[LinearSite]]:
        """Sites grouped by shared activation input, in graph order."""
        return list(self.groups.values())

    def site_of_output(self, value: ir.Value) -> LinearSite | None:
        node = _walk_up(value)
        if node is not None and node.op_type == "Concat":
            # KV cache: concat(past, new) along the sequence axis; the past came from this same
            # projection at earlier steps, so channels still map one to one
            found = [s for s in map(self.site_of_output, node.inputs) if s is not None]
            return found[0] if len(found) == 1 else None
        if node is not None and node.op_type == "Add" and node.domain == "":  # a bias after the linear
            for operand in node.inputs:
                site = self.by_node.get(id(operand.producer())) if operand is not None else None
                if site is not None and isinstance(output_bias(site), ir.Value):
                    return site
            return None
        return self.by_node.get(id(node)) if node is not None else None

    def _feeder(self, site: LinearSite) -> Feeder:
        node = _walk_up(site.input)
        if node is None:
            return Feeder("other", None)
        if (node.domain, node.op_type) in NORM_OPS:
            return Feeder("norm", node)
        if node.op_type == "Attention" and node.domain == "":
            v_site = self.site_of_output(node.inputs[2])
            if v_site is not None:
                return Feeder("attention_v", node, v_site)
            fused = self._fused_v(node.inputs[2])
            return Feeder("attention_v", node, fused[0], producer_columns=fused[1]) if fused else Feeder("other", node)
        if node.op_type == "MatMul" and id(node) not in self.by_node:
            v_site = self.site_of_output(node.inputs[1])  # softmax(QK^T) @ V
            if v_site is not None:
                return Feeder("attention_v", node, v_site)
            fused = self._fused_v(node.inputs[1])
            if fused is not None:
                return Feeder("attention_v", node, fused[0], producer_columns=fused[1])
        if node.op_type in POSITIVELY_HOMOGENEOUS_OPS and node.domain == "":  # OPT's fc1 -> ReLU -> fc2
            producer = self.site_of_output(node.inputs[0])
            if producer is not None:
                return Feeder("activated_linear", node, producer)
        if node.op_type == "Mul":
            for operand in node.inputs:
                up = self.site_of_output(operand)
                other = node.inputs[1] if operand is node.inputs[0] else node.inputs[0]
                if up is not None and self.site_of_output(other) is not up:
                    return Feeder("gated_linear", node, up)
            fused = self._fused_gate_up(node)
            if fused is not None:
                return Feeder("gated_linear", node, fused[0], producer_columns=fused[1], gate_columns=fused[2])
        return Feeder("other", node)

    def _fused_v(self, v: ir.Value) -> tuple[LinearSite, slice] | None:
        """(site, V columns) when attention's V is, through layout ops, a last-axis Slice / Split of
        one linear's output (a fused QKV projection); the other parts (Q, K) are other slices."""
        value, node = v, v.producer()
        while node is not None and node.op_type in _ACT_LAYOUT_OPS:
            value, node = node.inputs[0], node.inputs[0].producer()
        if node is not None and node.op_type == "Concat":  # KV cache: concat(past, new), as site_of_output
            found = [f for f in (self._fused_v(i) for i in node.inputs if i is not None) if f is not None]
            return found[0] if len(found) == 1 else None
        found = _column_slice(value)
        if found is None:
            return None
        site = self.by_node.get(id(_linear_behind(found[0])))
        if site is None or not all(c.op_type in ("Slice", "Split") for c in found[0].consumers()) or value.is_graph_output():
            return None
        return site, found[1]

    def _fused_gate_up(self, mul: ir.Node) -> tuple[LinearSite, slice, slice] | None:
        """(site, up columns, gate columns) when ``mul`` is ``up * act(gate)`` with up and gate two
        halves of one linear's output (Phi-3's gate_up_proj, split on the last axis): the up half
        is one operand directly, the gate half reaches the other through elementwise ops only."""
        for operand in mul.inputs:
            found = _column_slice(operand) if operand is not None else None
            site = self.by_node.get(id(_linear_behind(found[0]))) if found is not None else None
            if site is None:
                continue
            source, up = found
            cut = operand.producer()
            if cut.op_type == "Split":
                halves = [o for o in cut.outputs if o is not operand]
                readers = [cut]
            else:
                readers = [c for c in source.consumers() if c is not cut]
                halves = [r.outputs[0] for r in readers if r.op_type == "Slice"]
            if len(halves) != 1 or len(readers) != 1 or set(map(id, source.consumers())) != {id(cut), id(readers[0])}:
                continue
            if list(operand.consumers()) != [mul] or not all(c.op_type in ELEMENTWISE_OPS for c in halves[0].consumers()):
                continue  # another reader of a half would see its columns move
            gate_found = _column_slice(halves[0])
            if gate_found is None or gate_found[0] is not source:
                continue
            gate = gate_found[1]
            if gate.stop - gate.start != up.stop - up.start or not (gate.stop <= up.start or up.stop <= gate.start):
                continue
            other = mul.inputs[1] if operand is mul.inputs[0] else mul.inputs[0]
            if other is not None and _computed_elementwise_from(other, halves[0]):
                return site, up, gate
        return None


def find_linear_sites(graph: ir.Graph) -> LinearSiteMap:
    """Scan the main graph (subgraphs and functions are not visited) for linear sites."""
    sites: list[LinearSite] = []
    skipped: dict[str, str] = {}
    for node in graph:
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        traced = _trace_weight(node.inputs[1])
        if traced is None:
            continue
        weight, path = traced
        kept = node.metadata_props.get(FLOAT_SITE_KEY)
        if kept:  # a matrix a lowbit pass inserted and asks to keep exact (e.g. R1's tied-head bridge)
            skipped[site_name(node, weight)] = kept
            continue
        axis = _reduction_axis(node, weight, path)
        if axis is None or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
            why = "transposed A operand" if axis is not None else "weight is not a 2-D matrix (or is reshaped)"
            skipped[site_name(node, weight)] = why
            logger.debug("site %s skipped: %s", node.name, why)
            continue
        sites.append(LinearSite(node, weight, path, axis, name=site_name(node, weight)))
    site_map = LinearSiteMap(sites, skipped)
    for group in site_map.input_groups():
        for s in group:
            s.siblings = [o for o in group if o is not s]
    for s in sites:
        s.feeder = site_map._feeder(s)
    logger.info("found %d linear sites in %d input groups", len(sites), len(site_map.groups))
    return site_map


def selected_sites(sites: Iterable[LinearSite], exclude: Iterable[str]) -> list[LinearSite]:
    """The sites to quantize: ``sites`` (in order) minus those whose name matches any
    ``sites.exclude`` fnmatch pattern. The one site selector of every encoder and emitter."""
    patterns = tuple(exclude)
    return [s for s in sites if not matches_any(s, patterns)]


def matches_any(site: LinearSite, patterns: Iterable[str]) -> bool:
    """Whether ``site``'s name matches one of the fnmatch ``patterns`` (e.g. ``sites.int8_weights``)."""
    return any(fnmatch.fnmatch(site.name, p) for p in patterns)


# The structural analysis every pass reads: dropped after any graph edit, rebuilt on next read.
LINEAR_SITES: Key[LinearSiteMap] = Key("linear_sites", "linear sites (MatMul/Gemm with a constant weight) and their feeders",
                                       structural=True)  # fmt: skip
