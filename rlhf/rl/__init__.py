"""The policy and its RL loop: the LoRA policy, decoding, rollouts, the rewards it is scored by, and PPO."""
