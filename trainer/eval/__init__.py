"""Evaluation: acceptance length of a saved draft by greedy speculative decoding with the target."""
