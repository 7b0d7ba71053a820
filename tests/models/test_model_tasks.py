"""What a model directory's config says it is, and the calibration data each kind of model gets.

Fast (no export): task detection from transformers' config classes, the kind of an ONNX file,
image calibration windows (matplotlib's sample pictures or a user's directory), image processors
read without remote code, and the calibration paths of ``lowbit compile`` -- the README's bare
``.onnx`` with ``--calib-text`` and a tokenizer beside it, and the one-line errors otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from lowbit.errors import LowbitError
from lowbit.models import data
from lowbit.models.registry import hf_task, load_image_processor, max_positions, onnx_model_kind, resolve_model

from lowbit.models.tiny_hf import ARCHITECTURES, CAUSAL, config_for, write_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
        "def f(x): return x_1 - x_2, (a, b) = (b, a);\n") * 40  # fmt: skip


def _config_dir(directory: Path, config, architectures: list[str] | None) -> Path:
    config.architectures = architectures
    config.save_pretrained(directory)
    return directory


EXPECTED = {
    **{name: ("text-generation", "causal-lm", False) for name in CAUSAL},
    "bert": ("feature-extraction", "encoder", False),
    "bert-cls": ("text-classification", "encoder", False),
    "t5": ("feature-extraction", "encoder", True),
    "vit": ("image-classification", "vision", False),
}


@pytest.mark.parametrize("name", [*ARCHITECTURES, "bert-cls"])
def test_task_from_the_config_architectures(tmp_path, name):
    cls, config = config_for(name)
    directory = _config_dir(tmp_path / name, config, [cls.__name__])
    task = hf_task(directory)
    assert (task.task, task.kind, task.encoder_only) == EXPECTED[name]
    assert task.architecture == cls.__name__
    src = resolve_model(str(directory))
    assert (src.format, src.kind, src.task) == ("hf-dir", task.kind, task)
    assert task.output == ("last_hidden_state" if task.task == "feature-extraction" else "logits")
    if name == "t5":
        assert "the encoder of T5ForConditionalGeneration" in task.describe()


def test_base_models_and_configs_without_a_head(tmp_path):
    from transformers import LlamaConfig, T5Config, ViTConfig

    vit = hf_task(_config_dir(tmp_path / "vit", ViTConfig(), ["ViTModel"]))
    assert (vit.task, vit.kind, vit.output) == ("image-feature-extraction", "vision", "last_hidden_state")
    bare = hf_task(_config_dir(tmp_path / "llama", LlamaConfig(), None))  # no architectures: the base model
    assert (bare.task, bare.kind, bare.architecture) == ("feature-extraction", "encoder", "LlamaModel")
    enc = hf_task(_config_dir(tmp_path / "t5enc", T5Config(), ["T5EncoderModel"]))
    assert (enc.task, enc.kind, enc.encoder_only) == ("feature-extraction", "encoder", True)
    # GPT-2's LM head class does not end in ForCausalLM: transformers' mapping knows it
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert resolve_model(str(tmp_path / "g")).kind == "causal-lm"


def test_unsupported_models_are_one_line_errors(tmp_path):
    from transformers import BertConfig, WhisperConfig

    qa = _config_dir(tmp_path / "qa", BertConfig(), ["BertForQuestionAnswering"])
    with pytest.raises(LowbitError, match="BertForQuestionAnswering is not a model transformers maps to a task"):
        hf_task(qa)
    audio = _config_dir(tmp_path / "whisper", WhisperConfig(), ["WhisperModel"])
    with pytest.raises(LowbitError, match="WhisperModel reads 'input_features'"):
        hf_task(audio)
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps({"architectures": ["MyNetForMagic"]}))
    with pytest.raises(LowbitError, match="MyNetForMagic is not a model"):
        resolve_model(str(tmp_path / "custom"))


def _onnx_file(path: Path, inputs: dict[str, list], output: str, out_shape: list, props: dict | None = None) -> Path:
    first = next(iter(inputs))
    graph = helper.make_graph(
        [helper.make_node("Identity", [first], [output])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if props:
        helper.set_model_props(model, props)
    onnx.save(model, path)
    return path


def test_onnx_model_kind_reads_the_export_record_then_the_graph(tmp_path):
    vision = _onnx_file(tmp_path / "v.onnx", {"pixel_values": ["b", 3, 8, 8]}, "logits", ["b", 10])
    classifier = _onnx_file(tmp_path / "c.onnx", {"input_ids": ["b", "s"]}, "logits", ["b", 3])
    lm = _onnx_file(tmp_path / "l.onnx", {"input_ids": ["b", "s"]}, "logits", ["b", "s", 64])
    masked = _onnx_file(tmp_path / "m.onnx", {"input_ids": ["b", "s"]}, "logits", ["b", "s", 64],
                        {"lowbit.export.kind": "encoder", "lowbit.export.task": "fill-mask"})
    kinds = [onnx_model_kind(p) for p in (vision, classifier, lm, masked)]
    assert kinds == ["vision", "encoder", "causal-lm", "encoder"]


def test_max_positions_from_the_config(tmp_path):
    assert max_positions(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024, "model_type": "gpt2"}))
    assert max_positions(tmp_path) == (1024, "n_positions")


# -- images ------------------------------------------------------------------------------------


def _vit_processor_dir(directory: Path, **settings) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 16},
              "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **settings}  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def test_sample_images_ship_with_matplotlib():
    files = data.sample_image_files()
    assert [f.name for f in files] == list(data.SAMPLE_IMAGES) and all(f.is_file() for f in files)


def test_image_windows_are_deterministic_batches_of_distinct_views(tmp_path):
    processor = load_image_processor(_vit_processor_dir(tmp_path / "p"))
    windows = data.image_windows(processor, 3)
    assert [w.shape for w in windows] == [(data.IMAGES_PER_WINDOW, 3, 16, 16)] * 3
    assert all(w.dtype == np.float32 for w in windows)
    assert -1.0 <= min(float(w.min()) for w in windows) and max(float(w.max()) for w in windows) <= 1.0
    again = data.image_windows(processor, 3)
    assert all(np.array_equal(a, b) for a, b in zip(windows, again))
    views = np.concatenate(windows)  # 12 views of 3 pictures: the crops differ from each other
    assert len({v.tobytes() for v in views}) == len(views)


def test_user_image_directory(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "b.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(images / "a.jpg")  # grey JPEG
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden entries are ignored
    assert [f.name for f in data.image_files(images)] == ["a.jpg", "b.png"]
    processor = load_image_processor(_vit_processor_dir(tmp_path / "p"))
    windows = data.image_windows(processor, 2, image_dir=images, per_window=3)
    assert [w.shape for w in windows] == [(3, 3, 16, 16)] * 2


@pytest.mark.parametrize("entry, message", [
    ("notes.txt", "notes.txt: not a PNG or JPEG image (by its content)"),
    ("fake.png", "fake.png: not a PNG or JPEG image (by its content)"),
    ("sub", "sub: not a PNG or JPEG image (a directory)"),
])  # fmt: skip
def test_image_directory_refuses_anything_but_images(tmp_path, entry, message):
    images = tmp_path / "images"
    images.mkdir()
    if entry == "sub":
        (images / entry).mkdir()
    else:
        (images / entry).write_text("hello")
    with pytest.raises(LowbitError, match=re.escape(message)):
        data.image_files(images)


def test_broken_or_missing_images_are_one_line_errors(tmp_path):
    with pytest.raises(LowbitError, match="no such directory"):
        data.image_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="no PNG or JPEG images"):
        data.image_files(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # PNG magic, no image
    processor = load_image_processor(_vit_processor_dir(tmp_path / "p"))
    with pytest.raises(LowbitError, match="x.png: cannot read the image"):
        data.image_windows(processor, 1, image_dir=tmp_path / "broken")


def test_image_processor_is_transformers_own_class(tmp_path):
    from transformers import ViTImageProcessor

    fast = load_image_processor(_vit_processor_dir(tmp_path / "fast", image_processor_type="ViTImageProcessorFast"))
    assert type(fast) is ViTImageProcessor  # the slow variant: no torchvision needed
    legacy = load_image_processor(_vit_processor_dir(tmp_path / "old", image_processor_type=None,
                                                     feature_extractor_type="ViTFeatureExtractor"))
    assert type(legacy) is ViTImageProcessor
    # a custom class (auto_map) is never imported: the config's model_type picks transformers' class
    custom = _vit_processor_dir(tmp_path / "custom", image_processor_type="EvilProcessor",
                                auto_map={"AutoImageProcessor": "evil.EvilProcessor"})
    (custom / "evil.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').close()\n")
    with pytest.raises(LowbitError, match="'EvilProcessor' is not one of transformers' own classes"):
        load_image_processor(custom)
    (custom / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert type(load_image_processor(custom)) is ViTImageProcessor
    assert not (tmp_path / "MARKER").exists()
    with pytest.raises(LowbitError, match="no preprocessor_config.json"):
        load_image_processor(tmp_path)


def test_feeds_pass_pixel_values_through():
    from lowbit.ort.feeds import make_feed

    class Inp:
        name, type, shape = "pixel_values", "tensor(float)", ["b", 3, 16, 16]

    pixels = np.ones((2, 3, 16, 16), np.float64)
    feed = make_feed([Inp()], pixels)
    assert list(feed) == ["pixel_values"] and feed["pixel_values"].dtype == np.float32
    with pytest.raises(LowbitError, match="takes images"):
        make_feed([Inp()], np.ones((1, 16), np.int64))


# -- calibration paths of compile ----------------------------------------------------------------


def _tiny_decoder_file(path: Path) -> Path:
    from lowbit.models.synthetic import tiny_decoder

    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(tiny_decoder(), path)
    return path


SMALL = ["--set", "calibration.seq_len=32", "--set", "calibration.windows=2", "--set", "calibration.slac_lengths=[16]",
         "--set", "calibration.slac_windows=1"]  # fmt: skip


def test_readme_bare_onnx_with_calib_text_and_the_tokenizer_beside_it(tmp_path, capsys):
    """README: `lowbit compile model.onnx -o small.onnx ... --calib-text my.txt`."""
    from lowbit.compiler.cli import main

    model = _tiny_decoder_file(tmp_path / "m" / "model.onnx")
    write_tokenizer(model.parent, vocab_size=64)  # the tiny decoder's vocabulary
    (tmp_path / "my.txt").write_text(TEXT)
    argv = ["compile", str(model), "-o", str(tmp_path / "small.onnx"), "-r", "w8a8-rptq",
            "--calib-text", str(tmp_path / "my.txt"), *SMALL]  # fmt: skip
    assert main(argv) == 0
    assert "linear sites quantized with recipe 'w8a8-rptq'" in capsys.readouterr().out
    report = json.loads((tmp_path / "small.report.json").read_text())
    assert report["calibration"]["windows"] == 2 and report["calibration"]["source"] == str(tmp_path / "my.txt")
    (model.parent / "tokenizer.json").unlink()
    (model.parent / "tokenizer_config.json").unlink()
    assert main([*argv[:3], str(tmp_path / "again.onnx"), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the model's tokenizer (tokenizer.json) next to" in err
    assert f"{model.parent} has neither tokenizer.json nor tokenizer_config.json" in err


def test_calibration_refuses_the_wrong_kind_of_data(tmp_path):
    from lowbit.compiler import api
    from lowbit.core.recipe import load_recipe

    recipe = load_recipe("w8a8-rptq", ["calibration.seq_len=256", "calibration.windows=1"])
    text_model = _tiny_decoder_file(tmp_path / "t" / "model.onnx")
    write_tokenizer(text_model.parent, vocab_size=64)
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "images").mkdir()
    with pytest.raises(LowbitError, match="reads token ids: calibrate it on a text file"):
        api._calibration(str(tmp_path / "images"), api._resolve(text_model), recipe)
    (text_model.parent / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    with pytest.raises(LowbitError, match="windows of 256 tokens exceed the model's 128 positions "
                                          r"\(max_position_embeddings in .*config.json\)"):  # fmt: skip
        api._calibration(str(tmp_path / "calib.txt"), api._resolve(text_model), recipe)

    (tmp_path / "v").mkdir()
    image_model = _onnx_file(tmp_path / "v" / "model.onnx", {"pixel_values": ["b", 3, 16, 16]}, "logits",
                             ["b", 3, 16, 16])
    with pytest.raises(LowbitError, match="reads images \\(pixel_values\\): calibrate it on a directory"):
        api._calibration(str(tmp_path / "calib.txt"), api._resolve(image_model), recipe)
    with pytest.raises(LowbitError, match="no preprocessor_config.json"):
        api._calibration(None, api._resolve(image_model), recipe)
    _vit_processor_dir(image_model.parent)
    cal = api._calibration(None, api._resolve(image_model), recipe)
    assert [w.shape for w in cal.windows] == [(data.IMAGES_PER_WINDOW, 3, 16, 16)] and cal.probes == {}
    assert cal.source == "matplotlib sample images"
    given = api._calibration([np.zeros((3, 16, 16))], api._resolve(image_model), recipe)
    assert given.windows[0].shape == (1, 3, 16, 16) and given.windows[0].dtype == np.float32


def test_compile_cli_calibration_arguments(tmp_path, capsys):
    from lowbit.compiler.cli import main

    model = _tiny_decoder_file(tmp_path / "m" / "model.onnx")
    (tmp_path / "t.txt").write_text(TEXT)
    both = ["compile", str(model), "-o", str(tmp_path / "o.onnx"), "--calib-text", str(tmp_path / "t.txt"),
            "--calib-images", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(both)
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["compile", str(model), "-o", str(tmp_path / "o.onnx"), "--calib-images", str(tmp_path / "no")]) == 2
    assert "--calib-images " + str(tmp_path / "no") + ": no such directory" in capsys.readouterr().err


def test_custom_code_model_is_refused_as_such(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForMagic"],
                                                       "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    (directory / "modeling_evil.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').close()\n")
    with pytest.raises(LowbitError, match="model type 'evil' needs the directory's own code"):
        resolve_model(str(directory))
    assert not (tmp_path / "MARKER").exists()
