"""Chat models: the interface and stream machinery (``base``), llama.cpp in-process
(``llamacpp``), model servers (``servers``) and the settings-driven ``factory``. The sandboxed
chat template is ``appliance.core.chat_template`` (fine-tuning's Ollama export renders
templates too). Importing the package imports no backend library."""
