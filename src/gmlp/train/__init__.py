"""Training pipelines (vision, text) and the checkpointing they share."""
