"""gspo-cli: GSPO, GRPO and PPO under one RL loop, configured by Hydra."""
