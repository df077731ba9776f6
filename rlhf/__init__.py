"""RLHF tuning: preference data, reward model, PPO, bulk inference and evaluation, in plain Python."""
