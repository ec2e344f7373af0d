"""How every tool reports a user's mistake, as the training scripts do: one line naming the file or flag and the fix,
exit code 1, no traceback. A bug (any other exception) keeps its traceback. And how a tool keeps its hands off what
is already written: an output that exists is refused unless --overwrite, and an output that is an input, always."""
import os
import sys

from util.args import ExitCode
from util.errors import SetupError

USER_ERRORS = (OSError, ValueError, SetupError)


def run_tool(main) -> int:
    """main() -> exit code, with a user's mistake reported in one line on stderr."""
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.FAILED


def check_outputs(outputs: list[str], inputs: list[str], overwrite: bool, flag: str = "--out") -> None:
    """Before any compute: no output may be an input, and none may exist unless `overwrite`."""
    for out in outputs:
        for given in inputs:
            if given and os.path.abspath(out) == os.path.abspath(given):
                raise SetupError(f"{flag}: {out} is also the input {given}; writing it would destroy the input. "
                                 f"Choose another {flag}.")
    existing = [out for out in outputs if os.path.exists(out)]
    if existing and not overwrite:
        raise SetupError(f"{flag}: {', '.join(existing)} already exist(s); choose another {flag}, or pass --overwrite "
                         "to replace it")
