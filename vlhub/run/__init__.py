"""The run's lifecycle: the run folder (lock, identity, resume decision), checkpoint files, the remote
store and uploader, preemption, secret masking and the metric logs."""
