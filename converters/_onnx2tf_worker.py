"""Runs inside the onnx2tf venv (its own tensorflow, onnxruntime and numpy<2), never imported
by edgekit: `python -I _onnx2tf_worker.py request.json`.

Converts one ONNX file with onnx2tf, finds which inputs and outputs changed layout by running
the ONNX model (onnxruntime) and the converted model (TensorFlow) on the sample feeds, and
writes a SavedModel whose `serving_default` signature is keyed by the ONNX input and output
names. Tries onnx2tf's default (channels-last) first, then with every input's shape kept as
it is; writes `result.json` with `stage` (`done` or `failed`), the layouts and every attempt.
Only the standard library, numpy and the venv's own packages are used here.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_NAME = re.compile(r"onnx_op_name:\s*(\S+)")
_MAX_COMBINATIONS = 64


def _write(path: Path, result: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)


def _channels_last(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1) if rank >= 3 else tuple(range(rank))


def _candidates(source: tuple[int, ...], artifact: tuple[Any, ...]) -> list[tuple[int, ...]]:
    """Permutations of `source` that give a shape compatible with `artifact` (None: any)."""
    found = []
    for perm in (tuple(range(len(source))), _channels_last(len(source))):
        if perm in found or len(artifact) != len(source):
            continue
        moved = tuple(source[axis] for axis in perm)
        if all(
            want is None or int(want) == have for want, have in zip(artifact, moved, strict=True)
        ):
            found.append(perm)
    return found


def _close(reference: Any, found: Any) -> float | None:
    """Max abs error relative to the reference's scale, or None when the shapes differ."""
    import numpy as np

    if tuple(reference.shape) != tuple(found.shape):
        return None
    if reference.dtype.kind not in "fc":
        return 0.0 if np.array_equal(reference, found) else float("inf")
    scale = max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
    return (
        float(np.max(np.abs(reference.astype(np.float64) - found))) / scale if found.size else 0.0
    )


def _convert(onnx2tf: Any, source: str, keep: list[str], log: io.StringIO) -> Any:
    arguments: dict[str, Any] = {
        "input_onnx_file_path": source,
        "output_folder_path": tempfile.mkdtemp(prefix="onnx2tf-"),
        "disable_model_save": True,
        "non_verbose": True,
        "verbosity": "error",
    }
    if keep:
        arguments["keep_shape_absolutely_input_names"] = keep
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return onnx2tf.convert(**arguments)


def _failure(error: BaseException, log: str, graph: Any) -> dict[str, Any]:
    text = _ANSI.sub("", log)
    match = _OP_NAME.search(text)
    op_name = match.group(1) if match else None
    op_type = None
    if op_name is not None:
        for node in graph.node:
            if node.name == op_name or (node.name and op_name.endswith(node.name)):
                op_name, op_type = node.name, node.op_type
                break
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return {
        "error": (lines[-1] if lines else type(error).__name__)[:400],
        "error_type": type(error).__name__,
        "op_name": op_name,
        "op_type": op_type,
    }


def _match(
    model: Any,
    feeds: list[dict[str, Any]],
    references: list[list[Any]],
    onnx_inputs: list[tuple[str, tuple[int, ...]]],
    onnx_outputs: list[tuple[str, tuple[int, ...]]],
) -> dict[str, Any] | None:
    """Input and output permutations under which the converted model reproduces the ONNX one."""
    import numpy as np

    tf_inputs = {tensor.name.split(":")[0]: tensor for tensor in model.inputs}
    order = []
    for tensor in model.inputs:
        name = tensor.name.split(":")[0]
        if name not in dict(onnx_inputs):
            return {"error": f"converted input {name!r} is not an ONNX input"}
        order.append(name)
    per_input = []
    for name in order:
        shape = dict(onnx_inputs)[name]
        options = _candidates(shape, tuple(tf_inputs[name].shape))
        if not options:
            return {
                "error": f"input {name}: converted shape {tuple(tf_inputs[name].shape)} is "
                f"no permutation of {shape}"
            }
        per_input.append(options)
    if len(model.outputs) != len(onnx_outputs):
        return {"error": f"{len(model.outputs)} outputs, the ONNX model has {len(onnx_outputs)}"}
    combinations = list(itertools.islice(itertools.product(*per_input), _MAX_COMBINATIONS))
    for combination in combinations:
        perms = dict(zip(order, combination, strict=True))
        outputs = model([np.transpose(feeds[0][name], perms[name]) for name in order])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        output_perms = []
        for raw, reference in zip(outputs, references[0], strict=True):
            value = np.asarray(raw)
            chosen = None
            for perm in _candidates(tuple(reference.shape), tuple(value.shape)):
                error = _close(np.transpose(reference, perm), value)
                if error is not None and error <= 1e-3:
                    chosen = perm
                    break
            if chosen is None:
                break
            output_perms.append(chosen)
        else:
            return {"inputs": perms, "order": order, "outputs": output_perms}
    return None


def _save(
    model: Any,
    destination: Path,
    order: list[str],
    perms: dict[str, tuple[int, ...]],
    onnx_inputs: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    output_names: list[str],
) -> None:
    import tensorflow as tf

    specs = [
        tf.TensorSpec(
            [onnx_inputs[name][axis] for axis in perms[name]], tf.as_dtype(dtypes[name]), name=name
        )
        for name in order
    ]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def serve(*args: Any) -> dict[str, Any]:
        values = model(list(args))
        values = values if isinstance(values, (list, tuple)) else [values]
        return {
            name: tf.identity(value, name=name)
            for name, value in zip(output_names, values, strict=True)
        }

    module = tf.Module()
    module.model = model
    module.serve = serve
    tf.saved_model.save(
        module, str(destination), signatures={"serving_default": serve.get_concrete_function()}
    )


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result_path = Path(request["result"])
    result: dict[str, Any] = {"stage": "started", "attempts": []}
    _write(result_path, result)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import numpy as np
        import onnx
        import onnx2tf
        import onnxruntime as ort
        import tensorflow as tf
    except Exception as e:  # noqa: BLE001  (the venv itself is broken: say so)
        result.update(stage="import_failed", error=f"{type(e).__name__}: {e}")
        _write(result_path, result)
        return 0
    result["versions"] = {
        "onnx2tf": getattr(onnx2tf, "__version__", "unknown"),
        "tensorflow": tf.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    source = request["onnx"]
    graph = onnx.load(source, load_external_data=False).graph
    with np.load(request["feeds"], allow_pickle=False) as archive:
        count = int(archive["count"])
        feeds = [
            {
                key.split("/", 1)[1]: archive[key]
                for key in archive.files
                if key.startswith(f"{index}/")
            }
            for index in range(count)
        ]
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    onnx_inputs = [
        (i.name, tuple(int(d) for d in feeds[0][i.name].shape)) for i in session.get_inputs()
    ]
    dtypes = {name: str(feeds[0][name].dtype) for name, _ in onnx_inputs}
    references = [session.run(None, feed) for feed in feeds]
    onnx_outputs = [
        (o.name, tuple(references[0][i].shape)) for i, o in enumerate(session.get_outputs())
    ]
    attempts = [[], [name for name, shape in onnx_inputs if len(shape) >= 3]]
    if not attempts[1]:
        attempts = attempts[:1]
    for keep in attempts:
        attempt: dict[str, Any] = {"keep_shape_inputs": keep}
        result["attempts"].append(attempt)
        log = io.StringIO()
        try:
            model = _convert(onnx2tf, source, keep, log)
        except BaseException as e:  # noqa: BLE001  (onnx2tf raises anything, even SystemExit)
            attempt.update(_failure(e, log.getvalue(), graph))
            continue
        try:
            matched = _match(model, feeds, references, onnx_inputs, onnx_outputs)
        except Exception as e:  # noqa: BLE001
            attempt.update(
                error=f"the converted model fails to run: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            )
            continue
        if matched is None or "error" in matched:
            attempt["error"] = (matched or {}).get(
                "error",
                "the converted model's outputs differ from the ONNX model's under every "
                "input layout tried",
            )
            continue
        destination = Path(request["saved_model"])
        try:
            _save(
                model,
                destination,
                matched["order"],
                matched["inputs"],
                dict(onnx_inputs),
                dtypes,
                [name for name, _ in onnx_outputs],
            )
            loaded = tf.saved_model.load(str(destination)).signatures["serving_default"]
            worst = 0.0
            for feed, reference in zip(feeds, references, strict=True):
                values = loaded(
                    **{
                        name: tf.constant(np.transpose(feed[name], matched["inputs"][name]))
                        for name in matched["order"]
                    }
                )
                for (name, _), perm, ref in zip(
                    onnx_outputs, matched["outputs"], reference, strict=True
                ):
                    error = _close(np.transpose(ref, perm), values[name].numpy())
                    worst = max(worst, float("inf") if error is None else error)
        except Exception as e:  # noqa: BLE001
            attempt.update(
                error=f"saving the SavedModel failed: {type(e).__name__}: {str(e).strip()[:300]}",
                traceback=traceback.format_exc()[-2000:],
            )
            continue
        attempt["max_relative_error"] = worst
        result.update(
            stage="done",
            inputs=[
                {
                    "name": name,
                    "source_shape": list(shape),
                    "permutation": list(matched["inputs"][name]),
                }
                for name, shape in onnx_inputs
            ],
            outputs=[
                {"name": name, "source_shape": list(shape), "permutation": list(perm)}
                for (name, shape), perm in zip(onnx_outputs, matched["outputs"], strict=True)
            ],
            max_relative_error=worst,
        )
        _write(result_path, result)
        return 0
    result["stage"] = "failed"
    _write(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
