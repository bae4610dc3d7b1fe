"""`factory train ...`: reproduce every shipped weight from a seed (checkpointed, resumable)."""
