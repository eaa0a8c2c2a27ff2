"""Training: one trial's state and loop, and evaluation."""
