"""The rows people train on: reading data files, chat conversations, tokenizing, packing."""
