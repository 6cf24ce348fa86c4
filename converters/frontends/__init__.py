"""Frontends: model formats the ONNX and TFLite passes cannot read directly, brought to one
they can (PyTorch to ONNX or TFLite; ONNX to a TensorFlow SavedModel with onnx2tf).

Each frontend is a library function returning a typed result (what was made, the reference the
candidates are validated against, any layout change) and a registered pass over it. Heavy
libraries (torch, litert-torch) are imported inside the functions; onnx2tf runs in its own venv.
"""
