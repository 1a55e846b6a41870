"""The runtime around the model: the inference engine and, later, the expert-parallel cluster pieces."""
