"""What the entry scripts share: one-line errors with an exit code, and start-up chatter held back.

Exit codes of the scripts: 0 done; 2 a command line or input the script cannot use (one line on stderr);
1 a failure while running (also one line).
"""
import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, NoReturn, TypeVar

T = TypeVar("T")


def fail(program: str, message: str, code: int = 2) -> NoReturn:
    """Prints ``PROGRAM: error: MESSAGE`` as one line on stderr and exits with ``code``."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


class Held:
    """Set ``show = False`` inside :func:`stderr_held` to drop what was held back."""

    show = True


@contextlib.contextmanager
def stderr_held() -> Iterator[Held]:
    """Holds back what is written to file descriptor 2 (TensorFlow's and XLA's start-up chatter included) and
    writes it out at the end of the block, unless the block sets ``show = False`` on what it yields, so that an
    error can be reported as the only line."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = Held()
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.show:
                buffer.seek(0)
                sys.stderr.buffer.write(buffer.read())
                sys.stderr.flush()


def run_or_fail(program: str, work: Callable[[], T]) -> T:
    """Runs ``work()`` with start-up chatter held back and returns its result. A model, config or dataset the
    tool cannot use exits 2, a checkpoint that cannot be read exits 1, each as one ``PROGRAM: error:`` line."""
    error = None
    with stderr_held() as held:
        from attn_flax import data, trained
        from attn_flax.training import checkpoints, config_checks

        try:
            return work()
        except (trained.LoadError, config_checks.ConfigError, data.DatasetNotPreparedError, ValueError) as err:
            error, held.show = (err, 2), False
        except checkpoints.CheckpointError as err:
            error, held.show = (err, 1), False
    fail(program, str(error[0]).splitlines()[0], error[1])
