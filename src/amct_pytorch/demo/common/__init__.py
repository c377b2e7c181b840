"""What every demo shares, written once (each module imports only the library's public names and
the modules of this folder listed before it):

- `deps`: optional dependencies, imported with an error that names the `demo` extra;
- `settings`: a quantization setting, --config files, --quick/--steps/--batch-size, the plan line;
- `training`: phase timer, progress bar, clip ranges, the optimiser's parameter groups with the
  warm-up/decay schedule, one optimiser step, the distillation training loop;
- `ort`: the third-party log silencer and the ONNX Runtime CPU session the demos run;
- `report`: the output folder, report.json, plot.png (atomic writes) and the closing line;
- `cli`: how a demo declares its own command-line options (read by `amct_pytorch.cli`).
"""
