"""What a finished run gives back: the adapter merged into the dequantized base, a GGUF file, generation."""
