"""The main job: whole-model QAT of all-MiniLM-L6-v2, float vs PTQ vs QAT (`amct-qat demo`)."""
