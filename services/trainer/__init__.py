"""Offline DPO trainer: streams scored shards (stored token ids + reference log-probs) into training.

See services/trainer/train.py for the training loop and the launch commands.
"""
