"""The static site, rendered from the store's rows. Nothing in this package imports torch."""
