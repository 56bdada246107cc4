"""The draft models and their serving format: config, shared modules, Eagle-3, P-EAGLE, layers,
attention masks, losses, vocabulary mapping, the verifier head, and export to the
speculators/vLLM checkpoint. Nothing here imports the training loop."""
