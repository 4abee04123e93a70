"""The training loop: the trainer, one step, gradient strategies, precision, prefetch and compile."""
