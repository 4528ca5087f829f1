"""The study layer: the search space, baselines, the memory model, objectives and constraints, the
Optuna study (Tuner), its storage and the coordination of workers, presets and a stored study's view."""
