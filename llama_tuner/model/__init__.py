"""The model layer: what a GGUF file holds (header, shapes, bytes), generated twins and the demo model."""
