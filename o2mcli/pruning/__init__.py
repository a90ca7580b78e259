"""Channel pruning of diffusers UNets into student templates (torch-pruning does the tracing and surgery)."""
