from app.train.metrics import StepTimer


def test_step_timer_reports_throughput_and_data_wait_then_resets():
    t = StepTimer()
    t.add(step_s=0.75, data_s=0.25, images=8)
    t.add(step_s=0.75, data_s=0.25, images=8)
    s = t.summary()
    assert s["images_per_s"] == 8.0
    assert s["step_time_s"] == 1.0
    assert s["data_wait_fraction"] == 0.25
    assert t.summary()["images_per_s"] == 0.0
