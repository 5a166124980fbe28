"""The build's stages, each a module on one contract (``contract``)."""
