"""The demo's generated assets: a tiny Llama-3.2-shaped model, its tokenizer and its data (not used at run time)."""
