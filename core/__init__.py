"""lowbit.core: what every stage of the compiler shares, with no ONNX Runtime in it.

Owns the recipe schema and its complete validation (``recipe``), the compile context and typed
analyses (``context``, ``analyses``, ``pass_base``), the graph facts passes agree on: linear sites
and their selector (``linear_sites``), attention K/V sites (``kv_sites``), where a channel scale or
permutation folds (``folding``), initializer helpers (``initializers``), and the input checks a
model must pass before any pass reads it (``model_checks``, ``float_types``, ``fisher_file``)."""
