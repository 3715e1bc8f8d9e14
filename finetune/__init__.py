"""Fine-tuning lifecycle: datasets, QLoRA, the gate, merge, GGUF export, the model registry."""
