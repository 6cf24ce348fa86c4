"""Small PyTorch models trained here on scikit-learn's bundled digits (nothing downloaded, a few
seconds on a laptop CPU), for tests, benchmarks and the docs.

`DigitsCNN` takes `pixels` float32 [N, 1, 8, 8] in [0, 1] (NCHW, as PyTorch does);
`DigitsGRU` reads the same image as 8 rows of 8 pixels, `rows` float32 [N, 8, 8]. Both give
logits [N, 10]. `export_torch_digits` trains one, saves it with `torch.export.save` (dynamic
batch) and writes calibration and validation `.npz` files keyed by its input name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from edgekit.converters.examples import load_digits_split

__all__ = ["TorchDigitsExample", "digits_module", "export_torch_digits"]

Array = npt.NDArray[Any]
Kind = Literal["cnn", "gru"]


@dataclass(frozen=True)
class TorchDigitsExample:
    """The trained module, its `.pt2`, its data and its own test outputs."""

    module: Any  # torch.nn.Module, in eval mode
    pt2_path: Path
    calibration_path: Path
    validation_path: Path
    input_name: str
    x_test: Array
    y_test: Array
    logits_test: Array
    test_accuracy: float


def digits_module(kind: Kind) -> Any:
    """An untrained `DigitsCNN` or `DigitsGRU` (torch is imported here)."""
    import torch

    class DigitsCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
            self.fc2 = torch.nn.Linear(64, 10)

        def forward(self, pixels: Any) -> Any:
            x = torch.relu(self.conv1(pixels))
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

    class DigitsGRU(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(8, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, rows: Any) -> Any:
            sequence, _ = self.gru(rows)
            return self.fc(sequence[:, -1])

    return DigitsCNN() if kind == "cnn" else DigitsGRU()


def export_torch_digits(
    folder: Path, *, kind: Kind = "cnn", epochs: int | None = None, seed: int = 0
) -> TorchDigitsExample:
    """Train the model, then write `digits_<kind>.pt2`, `calibration.npz`, `validation.npz`."""
    import torch
    from edgekit.converters.frontends.torch_frontend import export_module, save_pt2

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    if kind == "gru":
        x_train, x_test = x_train[:, 0], x_test[:, 0]
    module = digits_module(kind)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    inputs, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _epoch in range(epochs or (10 if kind == "cnn" else 15)):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(inputs[batch]), labels[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(x_test)).numpy()
    program = export_module(module, [x_test[:1]])
    pt2_path = folder / f"digits_{kind}.pt2"
    save_pt2(program, pt2_path)
    name = program.input_names[0]
    np.savez(folder / "calibration.npz", **{name: x_train[:128]})  # type: ignore[arg-type]
    np.savez(folder / "validation.npz", **{name: x_test})  # type: ignore[arg-type]
    return TorchDigitsExample(
        module=module,
        pt2_path=pt2_path,
        calibration_path=folder / "calibration.npz",
        validation_path=folder / "validation.npz",
        input_name=name,
        x_test=x_test,
        y_test=y_test,
        logits_test=logits,
        test_accuracy=float((logits.argmax(1) == y_test).mean()),
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m edgekit.converters.torch_examples [OUTDIR] [--kind cnn|gru]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m edgekit.converters.torch_examples",
        description="Train a PyTorch digits model on scikit-learn's bundled digits and write "
        "digits_<kind>.pt2 (torch.export.save), calibration.npz and validation.npz to OUTDIR.",
    )
    parser.add_argument("outdir", nargs="?", default="example", type=Path)
    parser.add_argument("--kind", choices=("cnn", "gru"), default="cnn")
    args = parser.parse_args(argv)
    example = export_torch_digits(args.outdir, kind=args.kind)
    sys.stdout.write(
        f"wrote {example.pt2_path} (test accuracy {example.test_accuracy:.3f}), "
        f"{example.calibration_path}, {example.validation_path}\n"
    )


if __name__ == "__main__":
    main()
