"""PyTorch in: `.pt2` programs and `nn.Module`s trained here on the digits, exported to ONNX
(dynamo exporter) and to TFLite (litert-torch), checked against PyTorch's own outputs; clear
refusals for TorchScript, pickles, untraceable models and a missing torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from edgekit.converters.frontends.torch_frontend import (
    TorchModel,
    TorchToOnnxPass,
    check_torch_file,
    export_litert,
    export_module,
    export_onnx,
    load_pt2,
    save_pt2,
)
from edgekit.converters.passes.base import PassContext
from edgekit.converters.passes.onnx_passes import CompatConfig, CompatPass
from edgekit.converters.tflite_compat import blocking_ops
from edgekit.converters.torch_examples import TorchDigitsExample, export_torch_digits

from edgekit.errors import ConversionError
from edgekit.profiles import load_profile
from edgekit.runtimes import LiteRtBackend, OnnxRuntimeBackend


@pytest.fixture(scope="session")
def torch_cnn(tmp_path_factory: pytest.TempPathFactory) -> TorchDigitsExample:
    return export_torch_digits(tmp_path_factory.mktemp("torch-cnn"), kind="cnn")


@pytest.fixture(scope="session")
def torch_gru(tmp_path_factory: pytest.TempPathFactory) -> TorchDigitsExample:
    return export_torch_digits(tmp_path_factory.mktemp("torch-gru"), kind="gru")


def _context(tmp_path: Path, profile: str = "raspberrypi") -> PassContext:
    return PassContext(profile=load_profile(profile), workdir=tmp_path, threads=1)


def test_trained_models_learn_the_digits(
    torch_cnn: TorchDigitsExample, torch_gru: TorchDigitsExample
) -> None:
    assert torch_cnn.test_accuracy > 0.93
    assert torch_gru.test_accuracy > 0.85


@pytest.mark.parametrize("kind", ["cnn", "gru"])
def test_pt2_to_onnx_with_dynamic_batch_matches_pytorch(
    kind: str, torch_cnn: TorchDigitsExample, torch_gru: TorchDigitsExample, tmp_path: Path
) -> None:
    example = torch_cnn if kind == "cnn" else torch_gru
    program = load_pt2(example.pt2_path)
    assert program.input_names == (example.input_name,)
    assert program.output_names == ("output_0",)
    assert program.dynamic_batch
    export = export_onnx(program, tmp_path / "model.onnx")
    runtime = OnnxRuntimeBackend(export.path)
    assert [spec.name for spec in runtime.inputs] == [example.input_name]
    assert isinstance(runtime.inputs[0].shape[0], str)  # symbolic batch
    reference = TorchModel(program)
    for rows in (1, 7):
        feed = {example.input_name: example.x_test[:rows]}
        expected = reference.run(feed)["output_0"]
        found = runtime.run(feed)["output_0"]
        assert found.shape == (rows, 10)
        np.testing.assert_allclose(found, expected, atol=1e-4)
    # The reference from PyTorch is the trained module's own output.
    np.testing.assert_allclose(
        reference.run({example.input_name: example.x_test})["output_0"],
        example.logits_test,
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", ["cnn", "gru"])
def test_module_to_onnx_loads_on_the_oldest_pi_runtime(
    kind: str, torch_cnn: TorchDigitsExample, torch_gru: TorchDigitsExample, tmp_path: Path
) -> None:
    example = torch_cnn if kind == "cnn" else torch_gru
    program = export_module(example.module, [example.x_test[:1]])
    assert program.dynamic_batch and not program.notes
    exported = export_onnx(program, tmp_path / "model.onnx")
    # The compat pass makes it loadable by onnxruntime 1.16.3 (raspberrypi's oldest).
    result = CompatPass(CompatConfig(runtime_version="1.16.3")).run(
        exported.path, tmp_path / "compat.onnx", _context(tmp_path)
    )
    assert result.details["ir_version"] <= 9
    feed = {example.input_name: example.x_test[:5]}
    np.testing.assert_allclose(
        OnnxRuntimeBackend(tmp_path / "compat.onnx").run(feed)["output_0"],
        example.logits_test[:5],
        atol=1e-4,
    )


def test_torch_to_onnx_pass_reports_the_export(
    torch_cnn: TorchDigitsExample, tmp_path: Path
) -> None:
    result = TorchToOnnxPass().run(torch_cnn.pt2_path, tmp_path / "m.onnx", _context(tmp_path))
    assert result.details["format"] == "torch"
    assert result.details["dynamic_batch"] is True
    assert result.details["export"]["exporter"].startswith("torch.onnx.export dynamo")
    assert (tmp_path / "m.onnx").stat().st_size > 10_000


class _FixedBatch(torch.nn.Module):
    """Flattens with a hard-coded batch of one: no dynamic batch is possible."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, pixels: Any) -> Any:
        return self.fc(pixels.reshape(1, 64))


def test_static_batch_fallback_is_noted(tmp_path: Path) -> None:
    program = export_module(_FixedBatch(), [np.zeros((1, 1, 8, 8), np.float32)])
    assert not program.dynamic_batch
    assert program.notes and program.notes[0].startswith("static batch")
    export = export_onnx(program, tmp_path / "fixed.onnx")
    assert not export.dynamic_batch
    assert any("static batch" in note for note in export.notes)
    assert OnnxRuntimeBackend(export.path).inputs[0].shape == (1, 1, 8, 8)


class _DataDependent(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        if x.sum() > 0:  # Python control flow on a value: not traceable
            return x * 2
        return x


def test_untraceable_model_is_refused_with_a_short_message() -> None:
    with pytest.raises(ConversionError) as caught:
        export_module(_DataDependent(), [np.ones((1, 4), np.float32)])
    message = str(caught.value)
    assert message.startswith("torch.export cannot trace _DataDependent:")
    assert "torch.cond" in message
    assert len(message) < 600 and "\n" not in message


def test_torchscript_pickles_and_junk_are_refused_before_loading(tmp_path: Path) -> None:
    module = torch.nn.Linear(4, 2)
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(module, torch.zeros(1, 4)).save(str(scripted))
    pickled = tmp_path / "pickled.pt"
    torch.save(module, pickled)
    weights = tmp_path / "weights.pt"
    torch.save(module.state_dict(), weights)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model")
    cases = {
        scripted: "TorchScript archive",
        pickled: "pickled model or state_dict",
        weights: "pickled model or state_dict",
        junk: "not a PyTorch archive",
        tmp_path: "is a folder",
        tmp_path / "missing.pt2": "does not exist",
    }
    for path, expected in cases.items():
        with pytest.raises(ConversionError, match=expected) as caught:
            load_pt2(path)
        if path.exists() and path.is_file():
            assert "torch.export.save" in str(caught.value)


def test_a_pt2_saved_here_passes_the_check(torch_cnn: TorchDigitsExample) -> None:
    check_torch_file(torch_cnn.pt2_path)  # does not raise
    program = load_pt2(torch_cnn.pt2_path, output_names=["logits"])
    assert program.output_names == ("logits",)
    with pytest.raises(ConversionError, match="one distinct name per output"):
        load_pt2(torch_cnn.pt2_path, output_names=["a", "b"])


def test_missing_torch_extra_is_a_clear_error(torch_cnn: TorchDigitsExample) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from edgekit.converters.frontends.torch_frontend import load_pt2\n"
        "from edgekit.errors import ConversionError\n"
        "try:\n"
        f"    load_pt2(Path({str(torch_cnn.pt2_path)!r}))\n"
        "except ConversionError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert "pip install 'edgekit[torch]'" in done.stdout


@pytest.mark.parametrize("kind", ["cnn", pytest.param("gru", marks=pytest.mark.slow)])
def test_litert_torch_fp32_keeps_names_and_layout(
    kind: str, torch_cnn: TorchDigitsExample, torch_gru: TorchDigitsExample, tmp_path: Path
) -> None:
    example = torch_cnn if kind == "cnn" else torch_gru
    program = load_pt2(example.pt2_path)
    export = export_litert(program, tmp_path / "model.tflite")
    assert export.exporter.startswith("litert-torch 0.10")
    runtime = LiteRtBackend(export.path)
    assert [spec.name for spec in runtime.inputs] == [example.input_name]
    assert [spec.name for spec in runtime.outputs] == ["output_0"]
    # PyTorch's layout is kept: NCHW for the CNN.
    assert runtime.inputs[0].shape == (1, *example.x_test.shape[1:])
    worst = max(
        float(
            np.abs(
                runtime.run({example.input_name: example.x_test[i : i + 1]})["output_0"]
                - example.logits_test[i : i + 1]
            ).max()
        )
        for i in range(20)
    )
    assert worst < 1e-3
    # tflite-runtime 2.14 (raspberrypi-tflite's oldest) loads its op versions.
    assert blocking_ops(export.path, load_profile("raspberrypi-tflite")) == []


def test_pt2_round_trip_keeps_the_program(torch_gru: TorchDigitsExample, tmp_path: Path) -> None:
    program = load_pt2(torch_gru.pt2_path)
    save_pt2(program, tmp_path / "again.pt2")
    again = load_pt2(tmp_path / "again.pt2")
    feed = {"rows": torch_gru.x_test[:3]}
    np.testing.assert_array_equal(
        TorchModel(again).run(feed)["output_0"], TorchModel(program).run(feed)["output_0"]
    )


@pytest.mark.slow
def test_examples_command_writes_a_pt2_and_its_data(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgekit.converters.torch_examples", str(tmp_path), "--kind", "gru"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith(f"wrote {tmp_path / 'digits_gru.pt2'} (test accuracy 0.")
    program = load_pt2(tmp_path / "digits_gru.pt2")
    with np.load(tmp_path / "validation.npz") as validation:
        rows = validation["rows"]
    assert rows.shape == (360, 8, 8)
    assert TorchModel(program).run({"rows": rows[:2]})["output_0"].shape == (2, 10)
