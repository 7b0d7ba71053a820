"""lowbit.emit: one emitter per target, each writing the encodings it is given into the graph.

``qdq`` (standard ONNX QDQ; ``qdq-fp4`` too), ``npu`` (standard integer QDQ, clusters as split
MatMuls), ``mixed`` (FGMP NVFP4/FP8 weight blocks), ``ort_cpu`` (lowbit's packed 4-bit custom ops)
``reorder_norm`` (the fused ReorderNorm op) and ``attention`` (eager attention -> the standard
Attention and RotaryEmbedding of opset 23 on ``ort-cpu``), ``merge_siblings`` (the
MatMulLowbit nodes reading one activation as one node and a Split), plus the quantizers inserted on activations:
``dynamic_act`` (run-time per-token groups), ``kv`` (attention K/V), ``fgmp_act`` /
``fgmp_static_act`` (FGMP activation blocks)."""
