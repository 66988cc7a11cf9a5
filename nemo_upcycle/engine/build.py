"""Building a NeMo-Run Partial (``fdl.build``, what ``run.run`` does before calling it) so that a refusal raised while
building (a data or source problem found by a constructor) stays one line: Fiddle re-raises such an error as a proxy
subclass whose message ends with a dump of every argument ("Fiddle context: ..."). Imports Fiddle only (no NeMo).
"""

from __future__ import annotations

import fiddle as fdl

from nemo_upcycle.errors import UpcycleError


def without_fiddle_context(e: BaseException) -> BaseException:
    """The exception itself, not Fiddle's proxy of it: ``fdl.build`` re-raises an error of a constructor it calls as
    a subclass whose message ends with a multi-KB dump of the arguments ("Fiddle context: ...")."""
    while hasattr(e, "proxy_base_exception") and isinstance(e.proxy_base_exception, BaseException):
        e = e.proxy_base_exception
    return e


def build(partial):
    """``fdl.build`` of a Partial (what ``run.run`` does before calling it), with an ``UpcycleError`` raised while
    building (a data or source refusal) re-raised as itself: one line, without Fiddle's dump of the arguments."""
    try:
        return fdl.build(partial)
    except UpcycleError as e:
        raise without_fiddle_context(e) from None
