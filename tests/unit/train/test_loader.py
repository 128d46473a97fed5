"""The multi-crop loader is a pure function of (config, cursor, step)."""

import pytest
import torch

from app.config import load_config
from app.data.loader import MultiCropLoader
from app.data.sampler import DataCursor


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    from app.data.synth import synthesize

    root = tmp_path_factory.mktemp("store").as_uri()
    synthesize(root + "/synth", seed=0, n_pool=12, n_seeds=2, n_eval_train=2, n_eval_val=2,
               image_size=32, n_corrupt=0)
    return root + "/synth/pool"


def _cfg(pool):
    return load_config("demo", [f"train.dataset={pool}", "train.batch_size_per_gpu=3",
                                "crops.global_crops_size=42", "crops.local_crops_size=14",
                                "crops.local_crops_number=2"])


def _batches(cfg, steps, workers, cursor=DataCursor(), start=0, rank=0, world=2):
    loader = MultiCropLoader(cfg, rank, world, cursor, start_step=start, num_workers=workers)
    return [loader.next_batch(s) for s in range(start, start + steps)], loader


def _same(a, b):
    assert a["keys"] == b["keys"]
    for k in ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list"):
        assert torch.equal(a[k], b[k]), k


def test_batches_do_not_depend_on_the_number_of_workers(pool):
    cfg = _cfg(pool)
    a, _ = _batches(cfg, 3, workers=0)
    b, _ = _batches(cfg, 3, workers=2)
    for x, y in zip(a, b):
        _same(x, y)


def test_resuming_at_a_cursor_gives_the_same_batches(pool):
    cfg = _cfg(pool)
    full, loader = _batches(cfg, 5, workers=0)  # 6 samples per rank per epoch: crosses epochs
    cursor = loader.cursor_at(3)
    assert cursor == DataCursor(1, 3)
    resumed, _ = _batches(cfg, 2, workers=0, cursor=cursor, start=3)
    for x, y in zip(full[3:], resumed):
        _same(x, y)


def test_batch_layout_is_crop_major_with_masks(pool):
    cfg = _cfg(pool)
    (batch,), _ = _batches(cfg, 1, workers=0)
    assert batch["collated_global_crops"].shape == (6, 3, 42, 42)
    assert batch["collated_local_crops"].shape == (6, 3, 14, 14)
    assert batch["collated_masks"].shape == (6, 9)
    assert len(batch["keys"]) == 3


def test_loading_does_not_touch_the_global_torch_rng(pool):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _batches(_cfg(pool), 2, workers=0)
    assert torch.equal(torch.rand(3), expected)


def _blocked_process(ctx):
    """A real process that waits on a pipe until it is killed (as a worker waits for indices)."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=reader.recv, daemon=True)
    proc.start()
    return proc, writer


def test_a_worker_killed_while_its_batch_is_received_is_named_not_an_eoferror():
    """The trainer's read of a batch fails (EOFError in the fd hand-over) a moment before the
    SIGKILLed worker is seen dead: the error names the worker and the signal (CI saw a bare
    `EOFError` as the job's last line)."""
    import multiprocessing
    import os
    import signal

    from app.data.loader import dead_worker_error
    from app.errors import is_expected, one_line

    ctx = multiprocessing.get_context("fork")
    (alive, w1), (victim, w2) = _blocked_process(ctx), _blocked_process(ctx)
    try:
        os.kill(victim.pid, signal.SIGKILL)
        error = dead_worker_error([alive, victim], EOFError())
        assert error is not None
        line = one_line(error)
        assert is_expected(error)
        assert line.startswith("DataLoader worker exited unexpectedly")
        assert f"pid {victim.pid} killed by signal SIGKILL" in line and "EOFError" in line
        assert str(alive.pid) not in line
    finally:
        alive.kill()
        alive.join()
        victim.join()


def test_a_read_error_with_every_worker_alive_is_not_blamed_on_a_worker():
    import multiprocessing

    from app.data.loader import dead_worker_error

    ctx = multiprocessing.get_context("fork")
    proc, _writer = _blocked_process(ctx)
    try:
        assert dead_worker_error([proc], ConnectionResetError("reset"), wait_s=0.2) is None
    finally:
        proc.kill()
        proc.join()
