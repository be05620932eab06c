"""Processes past one: torchrun start-up and barriers, FSDP2 sharding of the 4-bit base."""
