"""trainctl's exit statuses, shared by the command line and the supervisor of a local run."""

USAGE_ERROR = 2  # a user's mistake: one line on stderr, nothing started or written
FAILED = 1  # the run (or a cluster check) failed: the worker's own error is shown
PREEMPTED = 143  # 128 + SIGTERM: stopped on request with a checkpoint, resumable
