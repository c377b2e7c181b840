"""The main job: whole-model QAT of all-MiniLM-L6-v2, float vs PTQ vs QAT (`amct-qat demo`).

settings (built-in settings, Options) -> model, data -> run (evaluate, train, PTQ/QAT per setting)
-> deploy (ONNX export, ONNX Runtime accuracy and latency, ORT's own quantizations) -> report
(table, plot) -> main (`run_demo`); cli declares the options only this demo takes."""
