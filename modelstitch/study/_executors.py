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

from .._errors import StitchError

__all__ = ["EXECUTORS", "PairFailure", "run_local", "run_ray"]

Pair = tuple[str, str]
EXECUTORS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class PairFailure:
    """A pair whose task raised, or whose worker died more often than allowed."""

    error: str
    attempts: int


def run_local(work: Callable[[str, str], Any], pairs: Sequence[Pair]) -> Iterator[tuple[Pair, Any]]:
    """Run the pairs one after another in this process.

    An exception in one pair is recorded as a `PairFailure` and the others
    still run; ``KeyboardInterrupt`` stops everything.
    """
    for pair in pairs:
        try:
            yield pair, work(*pair)
        except Exception as err:  # a failed pair must not end a 25,000-cell study
            yield pair, PairFailure(_describe(err), attempts=1)


def run_ray(
    study: Any,
    pairs: Sequence[Pair],
    *,
    address: str | None = None,
    max_retries: int = 2,
    cpus_per_task: float = 1,
    gpus_per_task: float | None = None,
) -> Iterator[tuple[Pair, Any]]:
    """Run each pair as a Ray task; yield results as they arrive.

    The study (networks and data included) goes to the object store once and
    every task reads it from there. A task whose worker dies (killed, out of
    memory) is retried up to ``max_retries`` times by Ray; an exception raised
    by the task itself is not retried. Either way the pair then becomes a
    `PairFailure`.

    Args:
        study: the `Study` (pickled once into the object store).
        pairs: the pending pairs.
        address: a running Ray cluster (``"auto"``, ``"ray://host:10001"``...);
            ``None`` starts a local Ray instance unless one is already running.
        max_retries: retries of a task whose worker died.
        cpus_per_task: CPUs each task asks for (torch uses that many threads).
        gpus_per_task: GPUs each task asks for; default 1 when the study's
            device is CUDA, else 0.
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
            num_cpus=cpus_per_task, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False
        )
        study_ref = ray.put(study)
        refs = {task.remote(study_ref, a, b, cpus_per_task): (a, b) for a, b in pairs}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            pair = refs.pop(ready[0])
            try:
                yield pair, ray.get(ready[0])
            except ray.exceptions.RayError as err:
                attempts = 1 + (max_retries if isinstance(err, ray.exceptions.WorkerCrashedError) else 0)
                yield pair, PairFailure(_describe(err), attempts=attempts)
    finally:
        if started:
            ray.shutdown()


def _run_pair_task(study: Any, sender: str, receiver: str, cpus: float) -> Any:
    torch.set_num_threads(max(1, int(cpus)))
    return study._run_pair(sender, receiver)


def _describe(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return "".join(lines).strip()[-2000:]
