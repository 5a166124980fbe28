"""Models: loading (``load``), one adapter per architecture (``arch``), the GGUF check, random models of known shapes."""
