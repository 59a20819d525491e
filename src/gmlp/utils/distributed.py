"""One piece of work done by process 0 of a ``torch.distributed`` job while the others wait for its result."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LONG_WAIT_S", "process_zero_first"]

#: How long the other processes wait for process 0 by default: tokenizing a large corpus or scanning an
#: image tree on a network file system takes hours or minutes, past NCCL's own 10-minute timeout.
LONG_WAIT_S = 24 * 3600


def _identity(result: Any) -> Any:
    return result


def process_zero_first(
    work: Callable[[], Any],
    *,
    what: str,
    errors: Mapping[str, type[Exception]],
    share: Callable[[Any], Any] = _identity,
    timeout_s: float = LONG_WAIT_S,
) -> tuple[Any, Any]:
    """``work()`` in process 0 of the default group while the other processes wait: ``(result, shared)``,
    ``result`` being what ``work()`` returned (None in the other processes) and ``shared`` process 0's
    ``share(result)`` (picklable) in every process. Without a group of several processes: ``work()`` here.

    Every process of the group must call it (a collective). The others wait over a gloo group of their own
    (no GPU memory) with a ``timeout_s`` timeout. An error of ``work`` is raised in every process, where a
    barrier left the others waiting for process 0 until the launcher stopped them: in process 0 as it is;
    in the others as the nearest class of its type named in ``errors`` (``{class name: class}``: usage
    errors the command line prints as one line), else as a ``RuntimeError`` saying ``process 0 failed to
    {what}: {type}: {message}``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        result = work()
        return result, share(result)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    result, failure, box = None, None, [None, None]
    try:
        if dist.get_rank() == 0:
            try:
                result = work()
                box = [None, share(result)]
            except Exception as err:
                failure = err
                kind = next((c.__name__ for c in type(err).__mro__ if c.__name__ in errors),
                            type(err).__name__)
                box = [(kind, f"{err}"), None]
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if box[0] is not None:
        kind, message = box[0]
        if kind in errors:  # (a bad option or input: the same one-line usage error in every process)
            raise errors[kind](message)
        raise RuntimeError(f"process 0 failed to {what}: {kind}: {message}")
    return result, box[1]
