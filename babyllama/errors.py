"""The project's errors and its one way out for the user: a one-line message and exit status 2.

  check(cfg.dim > 0, "dim must be positive")   # in validate(): a ConfigError, printed before any work
  raise DataError(f"{path}:{line}: expected ...")  # bad input: the file (and line) and what was expected
  with user_errors(): main_work()               # every script: DataError/ConfigError -> "error: ..." on stderr, exit 2
  with ctrl_c(): main()                         # under __main__: Ctrl-C -> "interrupted (Ctrl-C)", exit 130
  quiet_ctrl_c_until_main()                     # a script's first line: the same for a Ctrl-C during its imports
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys


class ConfigError(ValueError):
    """A bad config key or value; scripts print it as one line and exit with status 2."""


class DataError(ValueError):
    """Input data that cannot be used (unreadable or unknown corpus, missing shards, a conversation that breaks the
    contract, data of another vocabulary or tokenizer): one line naming the file and what was expected, exit 2."""


def check(condition: bool, message: str) -> None:
    """For validate() methods: raise a one-line ConfigError when `condition` is false."""
    if not condition:
        raise ConfigError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def fail(msg: str) -> None:
    """One-line error for the user, exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def user_errors(*kinds: type):
    """Turns the errors a user can fix (DataError, ConfigError, and `kinds`) into one line and exit status 2."""
    try:
        yield
    except (DataError, ConfigError) + tuple(kinds) as e:
        fail(str(e))


def quiet_ctrl_c_until_main() -> None:
    """Called by a script that imports torch (seconds; a minute on a cold machine) before it does: a Ctrl-C until
    ctrl_c() is entered is one line and exit status 130, not the traceback of an import. Nothing is written before
    main() runs, so nothing is left half-done. A Ctrl-C that was ignored (a background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_before_main)


def _interrupted_before_main(signum, frame) -> None:
    sys.stdout.flush()
    print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    os._exit(130)


@contextlib.contextmanager
def ctrl_c():
    """A script's Ctrl-C outside a training loop (which saves last.pt first): one line, exit status 130, no
    traceback. Only around `main()` under `if __name__ == "__main__"`: main() itself still raises KeyboardInterrupt
    (its `finally` blocks have run: nothing is left half-written)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_before_main:  # main() may clean up after a Ctrl-C: Python's own
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
