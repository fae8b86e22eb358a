"""Using a trained model: loading it, greedy decoding, and lm-evaluation-harness scores."""
