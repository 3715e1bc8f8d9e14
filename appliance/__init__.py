"""The offline domain assistant appliance: settings, wiring, the core service and the CLI.

Importing this package is cheap: heavy libraries (torch, sentence-transformers, qdrant) are
imported lazily where they are used.
"""

__version__ = "0.1.0"
