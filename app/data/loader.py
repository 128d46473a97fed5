"""The multi-crop training loader: shards in storage -> augmented crops -> batches with masks.

    loader = MultiCropLoader(cfg, rank, world_size, cursor)
    batch = loader.next_batch(step)   # dict from `collate_data_and_masks` + "keys"

Workers decode and augment (each sample seeded from (seed, epoch, index), never from worker
state); the main process stacks the crops and draws the iBOT masks from a generator seeded by
(seed, step, rank). A batch is therefore a pure function of (config, cursor, step), whatever the
number of workers or the point a run was resumed from.

Bad samples (undecodable bytes, bytes that do not match the index's sha256, a shard shorter than
its index) are skipped and counted: the slot is filled by a substitute drawn from
(seed, epoch, index, attempt), so batches keep their size and stay deterministic. The loader
reports them (`skipped_samples`, one warning per sample) and `close()` stops the worker pool on
every exit path; a worker that dies or hangs is an error within `train.loader_timeout_s`.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import random
import signal
from typing import Any, Callable

import numpy as np
import torch

from app.data.sampler import DataCursor, ResumableSampler, advance, sample_seed, _mix

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 32  # consecutive bad samples for one slot before the data set is declared broken


class TooManyCorruptSamples(RuntimeError):
    """Every substitute tried for one batch slot was bad: the data set itself is broken."""


def substitute_index(seed: int, epoch: int, index: int, attempt: int, n: int) -> int:
    """The sample that stands in for bad sample `index` on try `attempt` (>= 1)."""
    return int(_mix(seed, epoch, index, attempt, 0x5B57) % n)


class MultiCropDataset(torch.utils.data.Dataset):
    """Random access to a dataset at a URI; item `(epoch, index)` -> crops dict + "key"."""

    def __init__(self, uri: str, transform: Callable, seed: int):
        from app.data.index import Dataset

        self.data = Dataset(uri)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        from app.data.decode import CorruptImage, decode_image
        from app.data.index import CorruptSample

        epoch, index = item
        skipped: list[str] = []
        i = index
        for attempt in range(MAX_SUBSTITUTES + 1):
            if attempt:
                i = substitute_index(self.seed, epoch, index, attempt, len(self.data))
            try:
                sample = self.data.get(i)
                image = decode_image(sample.image_bytes, sample.key)
                break
            except (CorruptImage, CorruptSample) as exc:
                skipped.append(str(exc))
        else:
            raise TooManyCorruptSamples(
                f"{self.data.uri}: {len(skipped)} bad samples in a row for one batch slot "
                f"(last: {skipped[-1]}); the data set is broken")
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            crops = self.transform(image)
        return {"global_crops": crops["global_crops"], "local_crops": crops.get("local_crops", []),
                "key": sample.key, "skipped": skipped}


class seeded_rng:
    """Seed torch / numpy / python RNGs for one sample and restore them afterwards (so a
    main-process loader with 0 workers does not disturb the training RNG streams)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self._saved[0])
        np.random.set_state(self._saved[1])
        random.setstate(self._saved[2])


def build_augmentation(cfg: Any) -> Callable:
    from app.data.augment import DataAugmentationDINO

    return DataAugmentationDINO.from_config(cfg.crops)


def _as_list(samples: list) -> list:
    return samples


def _worker_init(worker_id: int) -> None:
    # SIGTERM (pod preemption) is handled by the training process, which finishes its step,
    # checkpoints and then stops the workers itself; a worker dying first would abort that.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def dead_worker_error(workers: list, cause: BaseException, wait_s: float = 5.0) -> RuntimeError | None:
    """The error to raise when reading a batch failed with `cause` because a worker died, or None
    when every worker still lives after `wait_s`. A worker SIGKILLed while the trainer receives its
    batch (the tensor's file descriptor is handed over a socket) surfaces as EOFError or
    ConnectionError a moment before the process is seen dead, so the check waits for it."""
    if not workers:
        return None
    by_sentinel = {w.sentinel: w for w in workers}
    for sentinel in multiprocessing.connection.wait(list(by_sentinel), timeout=wait_s):
        by_sentinel[sentinel].join(timeout=wait_s)  # its fds close before it can be reaped
    dead = [w for w in workers if not w.is_alive()]
    if not dead:
        return None
    codes = []
    for w in dead:
        code = w.exitcode
        if code is not None and code < 0:
            codes.append(f"pid {w.pid} killed by signal {signal.Signals(-code).name}")
        else:
            codes.append(f"pid {w.pid} exit code {code}")
    hint = " (out of memory?)" if any(w.exitcode == -signal.SIGKILL for w in dead) else ""
    reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return RuntimeError(f"DataLoader worker exited unexpectedly: {', '.join(codes)}{hint} "
                        f"(the trainer saw {reason} reading its batch)")


class MultiCropLoader:
    """Batches of one rank; the first `next_batch` is step `start_step`, read from `cursor`.
    `cursor_at(step)` is where the stream stands before step `step` (saved in checkpoints)."""

    def __init__(self, cfg: Any, rank: int, world_size: int, cursor: DataCursor = DataCursor(),
                 start_step: int = 0, transform: Callable | None = None,
                 num_workers: int | None = None, timeout_s: float | None = None):
        from app.ssl.masking import BlockMaskGenerator

        self.cfg, self.rank = cfg, rank
        self.seed = cfg.run.seed
        self.batch_size = cfg.train.batch_size_per_gpu
        if not cfg.train.dataset:
            raise ValueError("'train.dataset' is empty: set it to a dataset URI (--set train.dataset=...)")
        self.dataset = MultiCropDataset(cfg.train.dataset, transform or build_augmentation(cfg), self.seed)
        self.sampler = ResumableSampler(len(self.dataset), rank, world_size, self.seed, cursor)
        self.start_cursor, self.start_step = cursor, start_step
        workers = cfg.train.num_workers if num_workers is None else num_workers
        timeout = cfg.train.loader_timeout_s if timeout_s is None else timeout_s
        self.skipped = 0  # bad samples replaced so far by this rank (since start_step)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=_as_list,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None, drop_last=True,
            # Its own generator: creating the iterator must not draw from the global torch RNG,
            # or a resumed run's drop-path stream would differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(_mix(self.seed, rank, 0x10AD)),
            worker_init_fn=_worker_init if workers > 0 else None,
            # A worker that hangs (a stuck read) is an error after this long, never a hung job.
            timeout=float(timeout) if workers > 0 else 0,
        )
        grid = cfg.crops.global_crops_size // cfg.model.patch_size
        self.n_tokens = grid * grid
        self.mask_generator = BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
        self._it = iter(self.loader)

    def cursor_at(self, step: int) -> DataCursor:
        batches = step - self.start_step
        return advance(self.start_cursor, batches * self.batch_size, self.sampler.per_rank)

    def close(self) -> None:
        """Stop the worker processes now (idempotent): without it a failed run would wait at
        exit for persistent workers blocked on their index queues."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "MultiCropLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next_batch(self, step: int, dtype: torch.dtype | None = None) -> dict[str, Any]:
        if self._it is None:
            raise RuntimeError("the loader was closed")
        try:
            samples = next(self._it)
        except (EOFError, ConnectionError) as exc:
            error = dead_worker_error(list(getattr(self._it, "_workers", ())), exc)
            if error is None:
                raise
            raise error from exc
        from app.ssl.masking import collate_data_and_masks

        for sample in samples:
            for reason in sample.get("skipped", ()):
                self.skipped += 1
                log.warning("skipped a bad sample (%d so far on rank %d): %s", self.skipped,
                            self.rank, reason)

        rng = np.random.default_rng(_mix(self.seed, step, self.rank, 0x3A5C))
        batch = collate_data_and_masks(
            samples, mask_ratio_tuple=tuple(self.cfg.ibot.mask_ratio_min_max),
            mask_probability=self.cfg.ibot.mask_sample_probability, n_tokens=self.n_tokens,
            mask_generator=self.mask_generator, rng=rng, dtype=dtype,
        )
        batch["keys"] = [s["key"] for s in samples]
        return batch


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
