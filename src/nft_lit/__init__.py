"""nft-lit: Negative-aware Fine-Tuning and RL baselines for LLM math reasoning, on Lightning."""

__version__ = "0.1.0"
