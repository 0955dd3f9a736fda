"""collab_rl: teach language models to collaborate with multiturn-aware rewards."""

__version__ = "0.1.0"
