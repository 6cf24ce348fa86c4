"""The conversion pipeline: ONNX model + device profile -> the fastest artifact within tolerance.

from edgekit.converters import convert
result = convert(Path("model.onnx"), profile="raspberrypi", output_dir=Path("out"))
print(result.chosen, result.report["summary"])
"""

from edgekit.converters.pipeline import CandidateReport, ConvertResult, convert

__all__ = ["CandidateReport", "ConvertResult", "convert"]
