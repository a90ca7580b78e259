"""The Typer application and the error policy every command shares."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import typer
from pydantic import BaseModel, Field, ValidationError

from o2mcli.cli.options import options
from o2mcli.errors import O2MError, OptionError, flag_name

def _flag_type_label() -> None:
    """On/off flags show no ``<bool>`` type in ``--help`` (typer labels every option with its type; a flag takes
    no value, so the label only misleads)."""
    from typer.core import TyperOption

    label = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else label(self, ctx)  # type: ignore


_flag_type_label()
app = typer.Typer(name="o2m", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="o2m: prune -> distill -> merge -> sample -> score, for diffusers UNets.")
_state = {"debug": os.environ.get("O2M_DEBUG") == "1"}


def debug_enabled() -> bool:
    return _state["debug"]


def _text(value: Any) -> str:
    """A value as the user typed it: text quoted, a list comma-separated."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _released(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a command as one run (o2mcli.outputs.one_run): it gives up the output names it reserved and forgets what
    it read, however it ended."""
    from o2mcli.outputs import one_run

    with one_run():
        return fn(*args, **kwargs)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input -> one line on stderr and exit 2; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return _released(fn, *args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except OptionError as e:
            if debug_enabled():
                raise
            fail(f"{flag_name(e.field)} {_text(e.value)}: {e.reason}")
        except O2MError as e:
            if debug_enabled():
                raise
            fail(str(e))
        except ValidationError as e:
            if debug_enabled():
                raise
            err = e.errors()[0]
            loc = flag_name("_".join(str(x) for x in err["loc"][:1])) if err["loc"] else "options"
            fail(f"{loc} {_text(err.get('input'))}: {err['msg'].removeprefix('Value error, ')}")
        except OSError as e:
            # Out of space, read-only or permission denied: the environment, not a bug. Atomic writes
            # removed their temporary files on the way out, so nothing half-written is left.
            if debug_enabled():
                raise
            where = e.filename or "output"
            fail(f"{where}: {e.strerror or e}; nothing was written (outputs are atomic)")
        except KeyboardInterrupt:
            fail("interrupted; outputs are written atomically, nothing half-written was left", 130)
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if debug_enabled():
                raise
            fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug for a traceback)", 1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        from o2mcli import __version__

        typer.echo(f"o2m {__version__}")
        raise typer.Exit()


class RootOptions(BaseModel):
    """``o2m``'s own options, before the command."""

    debug: bool = Field(False, description="Show Python tracebacks on errors.")
    version: bool = Field(False, description="Print o2m's version and exit.")


@app.callback()
@options(RootOptions, typer_kwargs={"version": {"is_eager": True, "callback": _version}})
def _root(**given: Any) -> None:
    if given["debug"]:
        _state["debug"] = True


def run_cli() -> None:
    """Entry point of the ``o2m`` console script and ``python -m o2mcli``."""
    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
    app()
