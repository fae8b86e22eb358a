"""Writing a run for other tools: PEFT adapter, merged Hugging Face model, GGUF for llama.cpp/Ollama, model card.

``python -m lora_tools.export`` (this package's __main__) is the command."""
