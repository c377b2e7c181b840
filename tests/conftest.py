"""Hypothesis runs derandomized so that CI is reproducible; failures it finds are kept as explicit tests."""
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci")
