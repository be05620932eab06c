"""The model a run trains: loading (quantized), LoRA, the inspect plan, quieting known library notes."""
