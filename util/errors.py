"""The errors a user causes: a missing file, a bad flag, a bad list or CSV, a checkpoint of another run.

Each is reported as one line that names the file or flag and the fix, with no traceback and exit code 1
(engine.run_reporting_failures). Anything else that escapes a run is a bug and is reported with its traceback.
"""


class SetupError(RuntimeError):
    """Bad input found before training (or before an evaluation): the message names the file or flag and the fix."""
