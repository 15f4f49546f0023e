"""Model architectures: what a config.json says (spec.py), and per family (llama.py, qwen2.py,
mistral.py; listed in registry.py) its config quirks and its decoder layer's tensors."""
