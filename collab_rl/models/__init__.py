"""Models: the Llama-family transformer and its heads."""
