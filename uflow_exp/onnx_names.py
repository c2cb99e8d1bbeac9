"""The exported graph's input and output names: shared by the export task that writes the graph and
the onnxruntime runner that reads it, so neither imports the other."""

INPUT_NAME = "images"
OUTPUT_NAME = "anomaly_map"


def latent_names(n_scales: int) -> list[str]:
    return [f"z{s}" for s in range(n_scales)]
