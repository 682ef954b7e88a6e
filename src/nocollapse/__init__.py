"""nocollapse: self-supervised learning whose prototypes and embeddings do not collapse."""

__version__ = "0.1.0"
