"""Step 1 of RLHF: two candidates per prompt, people pick the better one, exported as preference rows."""
