"""Instruction fine-tuning: instruction data read as chat messages, chat templates and loss masks."""
