"""The one error type the data pipeline raises for bad or unreadable data.

The launcher prints it as one line and exits 2; inside a worker it names the shard or the
file so the job's failure message says what to fix.
"""


class DataError(ValueError):
    """Data that cannot be used as given: missing, empty, corrupt, or not fitting the job."""
