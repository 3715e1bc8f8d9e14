"""Chat models: the interface and stream machinery (``base``), the sandboxed chat template
(``template``), llama.cpp in-process (``llamacpp``), model servers (``servers``) and the
settings-driven ``factory``. Importing the package imports no backend library."""
