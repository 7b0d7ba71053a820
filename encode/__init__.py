"""lowbit.encode: the exact encoding of every quantized tensor (``formats.Encoded``: codes,
scales, block layout). Owns weight rounding (``weights``: RTN; ``optq`` + ``optq_kernel``: GPTQ
with error feedback; ``scale_refit``: least-squares block scales) and static activation scales
(``activations``). Emitters write what these produce; nothing here edits the graph."""
