"""JSON read from files and headers: every way a hostile document fails becomes one :class:`CheckpointError`.

``json.loads`` alone lets a document nested 100 000 deep raise ``RecursionError`` and a 5000-digit integer raise
``ValueError: Exceeds the limit (4300 digits)``; callers would print those as they are. :func:`loads` says what is
wrong in words and names the file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from capmerge.errors import CheckpointError

#: Longest integer Python converts from text (``sys.get_int_max_str_digits()``; 4300 unless changed).
INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


def loads(text: str | bytes, what: str, where: str, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)``, with a :class:`CheckpointError` ``"<what> is not valid JSON: ..."`` naming
    ``where`` for every failure (syntax, encoding, nesting too deep, integers too long)."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, **kwargs)
    except RecursionError:
        raise CheckpointError(f"{what} is not valid JSON: nested too deeply (more than ~1000 levels)", where) from None
    except UnicodeError:
        raise CheckpointError(f"{what} is not valid UTF-8", where) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", where) from None
    except ValueError as e:  # int() of a numeral over the digit limit, or a ValueError raised by a hook
        if "digits" in str(e) and "integer" in str(e):
            raise CheckpointError(f"{what} holds an integer with more than {INT_DIGITS} digits", where) from None
        raise CheckpointError(f"{what} is not valid JSON: {e}", where) from None
