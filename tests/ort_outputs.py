"""Run an ONNX model in ONNX Runtime (CPU, default session options) and save every output.

    python ort_outputs.py model.onnx inputs.npz outputs.npz

Used by the tests under `qemu-x86_64 -cpu Haswell` (an x86 CPU with AVX2 and without VNNI), where
ORT's CPUID check picks the kernels such CPUs run. Imports numpy and onnxruntime only.
"""
import sys

import numpy as np
import onnxruntime as ort

model, inputs, outputs = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
feed = dict(np.load(inputs))
names = [o.name for o in session.get_outputs()]
np.savez(outputs, **dict(zip(names, session.run(None, feed))))
