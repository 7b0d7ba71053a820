"""lowbit.models: model adapters, ONNX export, calibration/evaluation data, evaluation.

Modules: ``registry`` (resolve shipped names / HF dirs / .onnx files), ``export`` (ONNX export,
cached), ``data`` (pydoc text split and token windows), ``evaluate`` (ORT perplexity, cosine,
latency), ``footprint`` (size on disk, bits per weight), ``synthetic`` (tiny torch-free ONNX
models for unit tests); ``cli_export`` / ``cli_eval`` (the commands).
Importing this package imports nothing heavy: torch loads only inside export functions.
"""
