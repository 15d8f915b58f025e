"""Training: DeepSpeed strategies, learning-rate schedule, loss, Lightning module and callbacks."""
