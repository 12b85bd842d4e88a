"""moe2edge: distil Nomic-Embed-v2-style MoE text embedders into edge students and compile them.

Sub-packages (each lives in its own top-level folder of the repository, installed under this root):
``teacher`` (model, checkpoints, upcycling, embedding API), ``kernels`` (fused MoE ops + reference
twins), ``student`` (distillation), ``targets`` (ONNX / OpenVINO / TensorRT), ``data`` (corpora,
readers, metrics) and ``compile`` (pipeline + CLI). Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
