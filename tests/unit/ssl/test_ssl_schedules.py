"""Per-iteration schedules: cosine with freeze/warm-up, teacher temperature, the Config wiring."""

import math

import numpy as np
import pytest

from app.config import Config, scaled_lr
from app.ssl.schedules import Schedules, cosine_schedule, teacher_temperature_schedule, value_at


def test_cosine_schedule_freeze_warmup_cosine():
    s = cosine_schedule(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.0, freeze_iters=3)
    assert s.shape == (20,)
    assert (s[:3] == 0).all()
    np.testing.assert_allclose(s[3:8], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert s[8] == pytest.approx(1.0)  # cosine starts at the base value
    n = 12
    for i in range(n):
        assert s[8 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / n)))
    assert np.all(np.diff(s[8:]) < 0)
    assert value_at(s, 1000) == s[-1]


def test_cosine_schedule_rejects_too_long_warmup():
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine_schedule(1.0, 0.0, total_iters=5, warmup_iters=6)


def test_teacher_temperature_warmup_then_constant():
    s = teacher_temperature_schedule(0.04, 0.07, warmup_iters=4, total_iters=10)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07] + [0.07] * 6)
    assert len(teacher_temperature_schedule(0.04, 0.07, warmup_iters=30, total_iters=10)) == 10


def small_config(**train):
    cfg = Config()
    cfg.optim.epochs = 10
    cfg.optim.warmup_epochs = 2
    cfg.optim.freeze_last_layer_epochs = 1
    cfg.teacher.warmup_teacher_temp_epochs = 3
    cfg.train.epoch_length = 10
    cfg.train.batch_size_per_gpu = 64
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_schedules_from_config_follow_the_recipe():
    cfg = small_config()
    s = Schedules.from_config(cfg, world_size=4)
    peak = scaled_lr(cfg, 4)
    assert peak == pytest.approx(cfg.optim.base_lr * math.sqrt(256 / 1024))
    assert s.total_iters == 100 and len(s.lr) == 100
    assert s.at(0).lr == 0.0 and s.at(19).lr == pytest.approx(peak)  # 20 warm-up iterations
    assert s.at(99).lr == pytest.approx(cfg.optim.min_lr, rel=0.05, abs=peak * 1e-3)
    assert s.at(0).wd == pytest.approx(0.04) and s.at(99).wd == pytest.approx(0.4, rel=1e-2)
    assert s.at(0).momentum == pytest.approx(0.992) and s.at(10**6).momentum == pytest.approx(1.0, abs=1e-5)
    assert s.at(0).teacher_temp == pytest.approx(0.04) and s.at(29).teacher_temp == pytest.approx(0.07)
    assert s.at(50).teacher_temp == pytest.approx(0.07)
    # last layer frozen for the first epoch (10 iterations), then exactly the lr schedule
    assert all(s.at(i).last_layer_lr == 0.0 for i in range(10))
    assert s.at(10).last_layer_lr == s.at(10).lr > 0


def test_max_steps_compresses_every_schedule():
    cfg = small_config(max_steps=50)  # half of epochs x epoch_length
    s = Schedules.from_config(cfg)
    assert s.total_iters == 50 and len(s.lr) == len(s.teacher_temp) == 50
    assert s.at(9).lr == pytest.approx(scaled_lr(cfg, 1))  # warm-up 2 epochs -> 10 iterations
    assert s.at(4).last_layer_lr == 0.0 and s.at(5).last_layer_lr > 0  # freeze 1 epoch -> 5
    assert s.at(14).teacher_temp == pytest.approx(0.07) and s.at(13).teacher_temp < 0.07
    assert s.at(49).wd == pytest.approx(0.4, rel=1e-2)
