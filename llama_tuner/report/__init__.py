"""The report layer: text reports, model comparison, exports of presets, memory plans, tables."""
