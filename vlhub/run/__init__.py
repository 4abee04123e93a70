"""The run's lifecycle, owned by one run session (``session.py``): the run folder (lock, identity,
resume decision, housekeeping), checkpoint files, the remote store, its restore and uploader,
preemption, secret masking and the metric logs."""
