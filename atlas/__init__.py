"""atlas: a static, searchable, citable website with one page per MLP neuron."""

__version__ = "0.1.0"
