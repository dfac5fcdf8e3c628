"""Training: config, optimizer, train state and step, sharding, checkpoints, the loop."""
