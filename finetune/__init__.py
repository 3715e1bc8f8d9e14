"""Fine-tuning lifecycle: datasets, QLoRA training, the gate, merge, GGUF export, the model registry."""
