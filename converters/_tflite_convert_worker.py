"""One TFLiteConverter run in a child process (`TfliteConvertConfig.isolated`).

TFLiteConverter's calibrator can crash the whole process (a segfault in `_feed_tensors` on an
onnx2tf SavedModel of a PyTorch GRU); run here, the crash fails one candidate instead of the
conversion. Request (JSON, argv[1]): the SavedModel, the representative feeds (`.npz` with
`<i>/<name>` entries), the output path and the `TfliteConvertConfig` fields. Exit status 0 and
the output written, or a non-zero status with the error as the last line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str]) -> int:
    """Convert as the request in `argv[1]` says."""
    from edgekit.converters.passes.tflite_passes import (
        TfliteConvertConfig,
        _quiet_converter,
        converter_for,
    )

    request = json.loads(Path(argv[1]).read_text())
    feeds: list[dict[str, Any]] = [{} for _ in range(int(request["count"]))]
    with np.load(request["feeds"], allow_pickle=False) as archive:
        for key in archive.files:
            index, name = key.split("/", 1)
            feeds[int(index)][name] = archive[key]
    fields = request["config"]
    config = TfliteConvertConfig(
        kind=fields["kind"],
        io_type=fields["io_type"],
        calibration_samples=int(fields["calibration_samples"]),
        converter_options=tuple((str(k), v) for k, v in fields["converter_options"]),
    )
    try:
        with _quiet_converter():
            converter = converter_for(
                Path(request["saved_model"]), config.kind, feeds, config=config
            )
            model = bytes(converter.convert())
    except Exception as e:  # noqa: BLE001  (reported to the parent as one line)
        from edgekit.errors import first_line

        sys.stderr.write(f"{type(e).__name__}: {first_line(e)}\n")
        return 1
    Path(request["output"]).write_bytes(model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
