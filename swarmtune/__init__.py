"""swarmtune: decentralized, bit-exact Evolution Strategies fine-tuning of language models."""

__version__ = "0.2.0"
