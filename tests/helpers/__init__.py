"""What several test files share, each module one concept: composed configs and runs (configs), tiny models
(models), objectives ready for a step (objectives), tensor comparison (tensors), spawned gloo ranks (ranks),
generated shards (shards) and generated evaluation folders (eval_folders). Test modules import from here,
never from each other."""
