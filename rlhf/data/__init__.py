"""Preference, prompt and pair files: reading from local paths or gs://, checking every row, splitting and formatting prompts."""
