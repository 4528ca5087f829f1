"""Fakes for tests: stand-ins for the launcher (llama.cpp) and the tracker. Nothing in ``tuner`` imports this."""
