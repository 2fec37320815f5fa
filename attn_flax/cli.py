"""What the entry scripts share: one-line errors with an exit code, and start-up chatter held back.

Exit codes of the scripts: 0 done; 2 a command line or input the script cannot use (one line on stderr);
1 a failure while running (also one line).
"""
import contextlib
import os
import re
import sys
import tempfile
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn, Optional, Sequence, TypeVar

if TYPE_CHECKING:
    import ml_collections

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


def config_spec(argv: list[str]) -> Optional[str]:
    """The last ``--config=FILE[:ARG]`` (or ``--config FILE[:ARG]``) of the command line, if any."""
    spec = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def config_file_problem(spec: Optional[str]) -> Optional[str]:
    """What is wrong with ``--config=spec`` when it names no file (ml_collections would log a traceback and go
    on); None when the file exists or no ``--config`` was given."""
    if spec is None:
        return None
    path = spec.split(":", 1)[0]
    if os.path.isfile(path):
        return None
    folder = os.path.dirname(path) or "."
    known = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    return (f"--config={spec}: the config file {path} does not exist"
            + (f"; {folder} has {', '.join(known)}" if known else "; give the path of a config file"))


def unknown_field_message(err: Exception, argv: list[str]) -> str:
    """One line for ml_collections' error on ``--config.KEY=V`` naming a field the config lacks."""
    lines = str(err.args[0] if err.args else err).replace("\\n", "\n").replace("\\'", "'").strip("'\"")
    lines = lines.splitlines()
    key = lines[0].strip("'\"") if lines else "?"
    given = [a.split("=")[0] for a in argv[1:] if re.match(rf"--config\.([\w.]+\.)?{re.escape(key)}(=|$)", a)]
    hint = f" ({lines[1].strip().rstrip('?')}?)" if len(lines) > 1 and "mean" in lines[1] else ""
    return (f"{given[0] if given else key}: the config has no field {key!r}{hint}; --config.KEY=VALUE sets only "
            "fields that the config file defines (see configs/default.py)")


def innermost(err: BaseException) -> BaseException:
    """The exception at the root of ``err``'s chain of causes."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def config_load_message(spec: Optional[str], err: BaseException) -> str:
    """One line for an exception raised while a config file loads: it is the config file's error."""
    root = innermost(err)
    return (f"--config={spec or 'configs/default.py'}: the config file cannot be loaded "
            f"({type(root).__name__}: {root})")


def load_config(spec: str, overrides: Sequence[str]) -> "ml_collections.ConfigDict":
    """The config that ``train.py --config=SPEC OVERRIDES`` trains with, parsed by the same ml_collections flag
    (``lock_config=True``); raises ``ValueError`` with the one line ``train.py`` would print."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train.py", f"--config={spec}", *overrides]
    problem = config_file_problem(spec)
    if problem:
        raise ValueError(problem)
    values = flags.FlagValues()
    try:  # the overrides are applied when the flag is defined, and checked when it is parsed
        config_flags.DEFINE_config_file("config", spec, flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
        values.config.keys()
        return values.config
    except flags.Error as err:
        raise ValueError(str(err)) from None
    except (KeyError, AttributeError) as err:
        raise ValueError(unknown_field_message(err, argv)) from None
    except Exception as err:  # noqa: BLE001 - anything the config file raises is the config file's error
        raise ValueError(config_load_message(spec, err)) from None
