"""The one exception type that reaches users as a one-line message."""


class CnnvisError(Exception):
    """A problem with the user's input (file, layer, argument), said in one line.

    The CLI prints ``cnnvis: error: <message>`` and exits with code 2; other exceptions are bugs
    and keep their traceback.

    A library function names its own arguments in Python's keyword form (``method='x'``) and
    lists them in ``params``; the CLI names its flags instead (``--method 'x'``, see
    :func:`cnnvis.cli.flag_message`), so library messages need not know the flags.
    """

    exit_code = 2

    def __init__(self, message: str, *, params=()):
        super().__init__(" ".join(str(message).split()))
        #: the library parameters the message names as ``name=value``
        self.params = (params,) if isinstance(params, str) else tuple(params)


def closest_names(name: str, candidates, n: int = 5) -> list:
    """The candidates most similar to ``name`` (for 'did you mean' hints)."""
    import difflib

    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not close:
        close = [c for c in candidates if name.lower() in c.lower()][:n]
    return close


def unknown_name_error(kind: str, name: str, candidates) -> CnnvisError:
    candidates = list(candidates)
    close = closest_names(name, candidates)
    hint = f"; closest: {', '.join(close)}" if close else ""
    shown = ", ".join(candidates[:30]) + (" ..." if len(candidates) > 30 else "")
    return CnnvisError(f"unknown {kind} {name!r}{hint} (known: {shown})")
