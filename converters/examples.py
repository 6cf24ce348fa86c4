"""Small example models trained here, for the README demo, tests and benchmarks.

`digits_cnn` trains a small CNN on scikit-learn's bundled 8x8 digits with plain numpy (no
framework, nothing downloaded) and exports it as ONNX: Conv-Relu-Conv-Relu-MaxPool-Gemm-Relu-Gemm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DigitsExample",
    "digits_cnn",
    "export_digits_cnn",
    "load_digits_split",
    "machine_files",
    "magika_inputs",
    "silero_stream",
]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class DigitsExample:
    """The exported model and its data splits (images [N, 1, 8, 8] float32 in [0, 1])."""

    model_path: Path
    calibration_path: Path
    validation_path: Path
    test_accuracy: float
    x_test: Array
    y_test: Array


def load_digits_split(seed: int = 0) -> tuple[Array, Array, Array, Array]:
    """Digits as float32 [N, 1, 8, 8] in [0, 1]; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def _im2col(x: Array, k: int = 3) -> Array:
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, c, k, k, h, w), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = padded[:, :, i : i + h, j : j + w]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * h * w, c * k * k)


def _col2im(cols: Array, shape: tuple[int, ...], k: int = 3) -> Array:
    n, c, h, w = shape
    cols6 = cols.reshape(n, h, w, c, k, k).transpose(0, 3, 4, 5, 1, 2)
    padded = np.zeros((n, c, h + 2, w + 2), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + h, j : j + w] += cols6[:, :, i, j]
    inner: Array = padded[:, :, 1:-1, 1:-1]
    return inner


def digits_cnn(
    *, epochs: int = 12, channels: tuple[int, int] = (16, 32), hidden: int = 128, seed: int = 0
) -> tuple[dict[str, Array], float, Array, Array]:
    """Train the CNN; returns its weights, test accuracy and the test split."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def he(*shape: int) -> Array:
        fan_in = int(np.prod(shape[1:]))
        weights: Array = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return weights.astype(np.float32)

    params = {
        "w1": he(c1, 1, 3, 3), "b1": np.zeros(c1, np.float32),
        "w2": he(c2, c1, 3, 3), "b2": np.zeros(c2, np.float32),
        "w3": he(hidden, c2 * 16), "b3": np.zeros(hidden, np.float32),
        "w4": he(10, hidden), "b4": np.zeros(10, np.float32),
    }  # fmt: skip
    moments = {key: np.zeros_like(value) for key, value in params.items()}
    velocity = {key: np.zeros_like(value) for key, value in params.items()}
    step = 0
    for _epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            grads = _gradients(params, x_train[batch], y_train[batch])
            step += 1
            for key, grad in grads.items():  # Adam
                moments[key] = 0.9 * moments[key] + 0.1 * grad
                velocity[key] = 0.999 * velocity[key] + 0.001 * grad**2
                m_hat = moments[key] / (1 - 0.9**step)
                v_hat = velocity[key] / (1 - 0.999**step)
                params[key] -= (3e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)
    logits = _forward(params, x_test)[0]
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    return params, accuracy, x_test, y_test


def _forward(params: dict[str, Array], x: Array) -> tuple[Array, dict[str, Array]]:
    n = x.shape[0]
    c1, c2 = params["w1"].shape[0], params["w2"].shape[0]
    cols1 = _im2col(x)
    z1 = (cols1 @ params["w1"].reshape(c1, -1).T + params["b1"]).reshape(n, 8, 8, c1)
    a1 = np.maximum(z1, 0).transpose(0, 3, 1, 2)
    cols2 = _im2col(a1)
    z2 = (cols2 @ params["w2"].reshape(c2, -1).T + params["b2"]).reshape(n, 8, 8, c2)
    a2 = np.maximum(z2, 0).transpose(0, 3, 1, 2)
    windows = a2.reshape(n, c2, 4, 2, 4, 2)
    pooled = windows.max(axis=(3, 5))
    flat = pooled.reshape(n, -1)
    z3 = flat @ params["w3"].T + params["b3"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ params["w4"].T + params["b4"]
    cache = {"cols1": cols1, "z1": z1, "a1": a1, "cols2": cols2, "z2": z2, "a2": a2,
             "pooled": pooled, "flat": flat, "z3": z3, "a3": a3}  # fmt: skip
    return logits, cache


def _gradients(params: dict[str, Array], x: Array, y: Array) -> dict[str, Array]:
    n = x.shape[0]
    c1, c2 = params["w1"].shape[0], params["w2"].shape[0]
    logits, cache = _forward(params, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    d_logits = probs
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    grads = {"w4": d_logits.T @ cache["a3"], "b4": d_logits.sum(axis=0)}
    d_a3 = d_logits @ params["w4"]
    d_z3 = d_a3 * (cache["z3"] > 0)
    grads["w3"], grads["b3"] = d_z3.T @ cache["flat"], d_z3.sum(axis=0)
    d_pooled = (d_z3 @ params["w3"]).reshape(cache["pooled"].shape)
    a2 = cache["a2"]
    windows = a2.reshape(n, c2, 4, 2, 4, 2)
    is_max = windows == cache["pooled"][:, :, :, None, :, None]
    d_a2 = (is_max * d_pooled[:, :, :, None, :, None]).reshape(a2.shape)
    d_z2 = d_a2.transpose(0, 2, 3, 1).reshape(-1, c2) * (cache["z2"].reshape(-1, c2) > 0)
    grads["w2"] = (d_z2.T @ cache["cols2"]).reshape(params["w2"].shape)
    grads["b2"] = d_z2.sum(axis=0)
    d_a1 = _col2im(d_z2 @ params["w2"].reshape(c2, -1), (n, c1, 8, 8))
    d_z1 = d_a1.transpose(0, 2, 3, 1).reshape(-1, c1) * (cache["z1"].reshape(-1, c1) > 0)
    grads["w1"] = (d_z1.T @ cache["cols1"]).reshape(params["w1"].shape)
    grads["b1"] = d_z1.sum(axis=0)
    return {key: value.astype(np.float32) for key, value in grads.items()}


def export_digits_cnn(
    output_dir: Path, *, epochs: int = 12, opset: int = 17, ir_version: int = 8
) -> DigitsExample:
    """Train the digits CNN and write `digits_cnn.onnx`, `calibration.npz`, `validation.npz`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    params, accuracy, x_test, y_test = digits_cnn(epochs=epochs)
    x_train, _, _, _ = load_digits_split()
    nodes = [
        helper.make_node("Conv", ["pixels", "w1", "b1"], ["z1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["z2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["z2"], ["a2"], name="relu2"),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2],
                         name="pool"),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["z3"], transB=1, name="fc1"),
        helper.make_node("Relu", ["z3"], ["a3"], name="relu3"),
        helper.make_node("Gemm", ["a3", "w4", "b4"], ["logits"], transB=1, name="fc2"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(value, key) for key, value in params.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgekit-examples"
    )
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / "digits_cnn.onnx"
    onnx.save_model(model, str(model_path))
    calibration_path = output_dir / "calibration.npz"
    validation_path = output_dir / "validation.npz"
    np.savez(calibration_path, pixels=x_train[:256])
    np.savez(validation_path, pixels=x_test)
    return DigitsExample(
        model_path=model_path,
        calibration_path=calibration_path,
        validation_path=validation_path,
        test_accuracy=accuracy,
        x_test=x_test,
        y_test=y_test,
    )


def machine_files(limit_per_pattern: int = 120) -> list[Path]:
    """Real files of this machine (Python sources, binaries, licences): realistic magika input."""
    import glob

    patterns = ["/usr/lib/python3*/*.py", "/usr/bin/*", "/usr/share/doc/*/copyright"]
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        files.extend(found[:limit_per_pattern])
    return files


def magika_inputs(files: list[Path], *, size: int = 1024, padding: int = 256) -> Array:
    """Magika's input for real files: first and last `size` bytes (whitespace stripped), padded.

    Returns int32 [N, 2 * size]; files that cannot be read are skipped.
    """
    rows = []
    for file in files:
        try:
            content = file.read_bytes()
        except OSError:
            continue
        begin = list(content.lstrip()[:size])
        end = list(content.rstrip()[-size:]) if content.strip() else []
        begin += [padding] * (size - len(begin))
        end = [padding] * (size - len(end)) + end
        rows.append(begin + end)
    return np.asarray(rows, dtype=np.int32)


_VOWEL_FORMANTS_HZ = (
    (730, 1090, 2440),  # a
    (270, 2290, 3010),  # i
    (300, 870, 2240),  # u
    (530, 1840, 2480),  # e
    (570, 840, 2410),  # o
)
_CONTEXT_SAMPLES = 64  # the silero-vad package prepends the previous chunk's last 64 samples


def speech_like(seconds: float, *, sample_rate: int = 16000, seed: int = 0) -> Array:
    """Formant-synthesized vowels: a glottal pulse train (110-150 Hz, drifting) shaped by the
    first three formants of a, i, u, e, o (150 ms each), with a syllable-rate envelope. Not
    speech, but close enough that a voice activity detector fires on it (the silero VAD gives
    0.5-0.99 on the voiced parts)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 120 + 10 * rng.standard_normal() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    segment = (t / 0.15).astype(int) % len(_VOWEL_FORMANTS_HZ)
    signal = np.zeros_like(t)
    for harmonic in range(1, 40):
        frequency = harmonic * pitch
        gain = np.zeros_like(t)
        for index, formants in enumerate(_VOWEL_FORMANTS_HZ):
            mask = segment == index
            gain[mask] = sum(1 / (1 + ((frequency[mask] - f) / 80) ** 2) for f in formants)
        signal += gain * np.sin(harmonic * phase) / np.sqrt(harmonic)
    envelope = np.sqrt(np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None))
    signal *= envelope
    return np.asarray(0.5 * signal / max(float(np.abs(signal).max()), 1e-9), dtype=np.float64)


def silero_stream(
    model_path: Path, *, chunks: int = 96, seed: int = 0, sample_rate: int = 16000
) -> dict[str, Array]:
    """Streaming inputs for the silero VAD: speech-like vowels, noise and silence.

    Each input is the previous chunk's last 64 samples followed by a new 512-sample chunk (576
    values, as the silero-vad package feeds it), and its state is the state the original
    model produced for the previous chunk, so calibration sees realistic LSTM states. Arrays
    carry a leading samples axis (see data.py).
    """
    from edgekit.runtimes import OnnxRuntimeBackend

    rng = np.random.default_rng(seed)
    total = chunks * 512
    signal = speech_like(total / sample_rate, sample_rate=sample_rate, seed=seed)
    third = total // 3
    signal[third : 2 * third] = 0.05 * rng.standard_normal(third)  # background noise
    signal[2 * third + third // 2 :] = 0.0  # silence
    signal = (signal + 0.002 * rng.standard_normal(total)).astype(np.float32)
    runtime = OnnxRuntimeBackend(model_path, threads=1)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)
    inputs, states = [], []
    sr = np.array(sample_rate, dtype=np.int64)
    for index in range(chunks):
        chunk = signal[index * 512 : (index + 1) * 512]
        window = np.concatenate([context, chunk])[None, :]
        inputs.append(window)
        states.append(state)
        state = runtime.run({"input": window, "state": state, "sr": sr})["stateN"]
        context = chunk[-_CONTEXT_SAMPLES:]
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": sr}


def main(argv: list[str] | None = None) -> None:
    """`python -m edgekit.converters.examples [OUTDIR]`: write the digits example there."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m edgekit.converters.examples",
        description="Train the digits CNN on scikit-learn's bundled digits (numpy only) and "
        "write digits_cnn.onnx, calibration.npz and validation.npz to OUTDIR.",
    )
    parser.add_argument("outdir", nargs="?", default="example", type=Path)
    output = parser.parse_args(argv).outdir
    example = export_digits_cnn(output)
    sys.stdout.write(
        f"wrote {example.model_path} (test accuracy {example.test_accuracy:.3f}), "
        f"{example.calibration_path}, {example.validation_path}\n"
    )


if __name__ == "__main__":
    main()
