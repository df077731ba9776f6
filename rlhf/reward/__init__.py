"""The reward model: a scalar head on the base model, packed scoring of prompt and completions, pairwise training and its evaluation."""
