"""Model serving with randomized coded inference (coded-smoothing)."""

__version__ = "0.1.0"
