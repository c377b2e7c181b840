"""The CNN demo: whole-model QAT of pretrained CREPE, float vs PTQ vs QAT (`amct-qat demo --model crepe`).

model (the network, decoding, metrics) -> data (synthesized tones) -> settings (built-in settings,
CrepeOptions) -> run (evaluate, train, PTQ/QAT per setting) -> deploy (ONNX export, ONNX Runtime
accuracy and latency) -> report (table, plot) -> main (`run_crepe_demo`); cli declares the
options only this demo takes."""
