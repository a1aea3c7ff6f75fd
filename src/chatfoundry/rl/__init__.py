"""Classic RL on Gymnasium: tabular Q-learning, DQN, REINFORCE, TRPO, PPO-clip and PPO with an
adaptive KL penalty. `core` holds the policy-gradient math the language model's PPO shares."""
