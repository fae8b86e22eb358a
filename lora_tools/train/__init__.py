"""What the recipes run: the launcher, the model's loss, device strategies, adapter init, RNG, stop signals, logs."""
