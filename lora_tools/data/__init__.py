"""Training data: reading files, the dataset builders the configs name, chat templates, packing and batches.

``python -m lora_tools.data`` (this package's __main__) shows what a config's data gives the model."""
