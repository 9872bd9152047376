"""edgeft: fine-tune a Hugging Face causal LM with LoRA and ship it, verified and benchmarked, to small devices."""

__version__ = "0.1.0"
