"""Ranks: environment discovery, collectives, rank liveness, the strategies (one file each) and sharded checkpoints."""
