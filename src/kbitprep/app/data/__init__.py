"""The rows people train on: their formats and files, chat conversations, tokenizing, packing."""
