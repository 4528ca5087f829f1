"""Fakes for tests: stand-ins for the launcher (llama.cpp) and the tracker. Nothing in ``llama_tuner`` imports this."""
