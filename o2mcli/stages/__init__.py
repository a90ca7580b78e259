"""The pipeline, one module per stage: train -> prune -> distill -> merge -> sample -> score."""
