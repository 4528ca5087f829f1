"""The tracking layer: a study and its trials in MLflow, with plots."""
