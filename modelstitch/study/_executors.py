"""Where a study's pairs run: in this process (``"local"``) or as Ray tasks (``"ray"``).

An executor takes the pending ``(sender, receiver)`` pairs and yields
``(pair, outcome)`` as each finishes, in any order. The outcome is the pair's
result or a `PairFailure`. Only the driver writes the results store.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .._errors import StitchError, first_line

__all__ = ["EXECUTORS", "PairFailure", "run_local", "run_ray"]

Pair = tuple[str, str]
EXECUTORS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class PairFailure:
    """A pair whose task raised, or whose worker died more often than allowed."""

    error: str
    attempts: int


def run_local(
    work: Callable[[str, str], Any],
    pairs: Sequence[Pair],
    *,
    keep_going: bool = False,
    max_retries: int = 2,
) -> Iterator[tuple[Pair, Any]]:
    """Run the pairs one after another in this process.

    A pair that runs out of device memory is retried up to ``max_retries``
    times (with the CUDA cache emptied), then recorded as a `PairFailure`. Any
    other exception is a bug or bad input: it stops the study with the pair
    named, unless ``keep_going``, when it is recorded and the others still
    run. ``KeyboardInterrupt`` always stops everything.

    Raises:
        StitchError: a pair raised and ``keep_going`` is False.
    """
    for pair in pairs:
        outcome: Any = None
        for attempt in range(1, max_retries + 2):
            try:
                outcome = work(*pair)
                break
            except torch.OutOfMemoryError as err:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                outcome = PairFailure(_describe(err), attempts=attempt)
            except Exception as err:
                if not keep_going:
                    raise _stop(pair, err) from err
                outcome = PairFailure(_describe(err), attempts=attempt)
                break
        yield pair, outcome


def run_ray(
    study: Any,
    pairs: Sequence[Pair],
    *,
    address: str | None = None,
    max_retries: int = 2,
    cpus_per_task: float = 1,
    gpus_per_task: float | None = None,
    keep_going: bool = False,
) -> Iterator[tuple[Pair, Any]]:
    """Run each pair as a Ray task; yield results as they arrive.

    The study (networks and data included) goes to the object store once and
    every task reads it from there. A task whose worker dies (killed, out of
    memory) or that runs out of device memory is retried up to ``max_retries``
    times by Ray, then becomes a `PairFailure`. Any other exception raised by
    the task stops the study (as in `run_local`) unless ``keep_going``.

    Args:
        study: the `Study` (pickled once into the object store).
        pairs: the pending pairs.
        address: a running Ray cluster (``"auto"``, ``"ray://host:10001"``...);
            ``None`` starts a local Ray instance unless one is already running.
        max_retries: retries of a task whose worker died.
        cpus_per_task: CPUs each task asks for (torch uses that many threads).
        gpus_per_task: GPUs each task asks for; default 1 when the study's
            device is CUDA, else 0.
        keep_going: record failing pairs and go on instead of stopping.

    Raises:
        StitchError: a task raised and ``keep_going`` is False.
    """
    try:
        import ray
    except ImportError:
        raise StitchError(
            "the 'ray' executor needs Ray: pip install \"modelstitch[ray]\" (or pip install ray)"
        ) from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        gpus = gpus_per_task if gpus_per_task is not None else (1 if study.device.type == "cuda" else 0)
        task = ray.remote(_run_pair_task).options(
            num_cpus=cpus_per_task, num_gpus=gpus, max_retries=max_retries, retry_exceptions=[torch.OutOfMemoryError]
        )
        study_ref = ray.put(study)
        refs = {task.remote(study_ref, a, b, cpus_per_task): (a, b) for a, b in pairs}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            pair = refs.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if isinstance(err.cause, BaseException) else err
                if not keep_going and not isinstance(cause, torch.OutOfMemoryError):
                    raise _stop(pair, cause) from err
                outcome = PairFailure(_describe(cause), attempts=1 + max_retries)
            except ray.exceptions.RayError as err:  # the worker died: retried by Ray, then recorded
                outcome = PairFailure(_describe(err), attempts=1 + max_retries)
            yield pair, outcome
    finally:
        if started:
            ray.shutdown()


def _run_pair_task(study: Any, sender: str, receiver: str, cpus: float) -> Any:
    torch.set_num_threads(max(1, int(cpus)))
    return study._run_pair(sender, receiver)


def _stop(pair: Pair, err: BaseException) -> StitchError:
    return StitchError(
        f"pair {pair[0]} -> {pair[1]} failed: {type(err).__name__}: {first_line(err)}; fix the cause and rerun "
        "(finished pairs are kept), or pass keep_going=True (--keep-going) to record failures and go on"
    )


def _describe(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return "".join(lines).strip()[-2000:]
