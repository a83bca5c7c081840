"""Mask-update spacing in the units researchers use, and the warning when a run is too short for it."""
import pytest

from sparsebench import cli
from sparsebench.config import validate
from sparsebench.errors import UserError
from sparsebench.train import build_run

# 800 training samples at batch 100: 8 steps per epoch.
BASE = ["dataset.num_samples=1000", "batch_size=100"]


def method_of(*overrides):
    cfg = validate(cli.resolve(cli.compose_config([*BASE, *overrides])))
    return build_run(cfg).method


def test_rigl_updates_per_epoch_sets_delta_t():
    method = method_of("method=rigl", "epochs=40", "method.updates_per_epoch=2")
    assert method.steps_per_epoch == 8 and method.delta_t == 4
    assert method.mask_update_steps() == list(range(4, method.end_step, 4))


def test_rigl_total_updates_gives_that_many_rounds_before_t_end():
    method = method_of("method=rigl", "epochs=40", "method.total_updates=12")
    steps = method.mask_update_steps()
    assert len(steps) == 12 and steps[-1] < method.end_step == 240


@pytest.mark.parametrize("method, key", [("gmp", "frequency"), ("dpf", "frequency")])
def test_pruning_schedules_accept_a_total_number_of_events(method, key):
    m = method_of(f"method={method}", "epochs=40", "method.total_updates=10")
    window = m.end_step - m.begin_step
    assert m.frequency == window // 10
    assert 10 <= len(m.mask_update_steps()) <= 12  # the grid plus `end`, which always prunes to the target


def test_gmp_updates_per_epoch():
    m = method_of("method=gmp", "epochs=40", "method.updates_per_epoch=0.5")
    assert m.frequency == 16
    events = m.mask_update_steps()
    assert all(b - a <= 16 for a, b in zip(events, events[1:]))


def test_short_run_warns_and_long_run_does_not():
    short = method_of("method=rigl", "epochs=5")  # 40 steps, T_end = 30 < delta_t = 100: no update at all
    assert short.mask_update_steps() == []
    warning = short.schedule_warning()
    assert warning.startswith("warning: method rigl plans 0 mask update(s) in 40 steps")
    assert "method.updates_per_epoch" in warning
    assert method_of("method=rigl", "epochs=5", "method.updates_per_epoch=2").schedule_warning() is None
    assert method_of("method=gmp", "epochs=5").schedule_warning() is not None
    assert method_of("method=static", "epochs=5").schedule_warning() is None  # nothing to schedule


@pytest.mark.parametrize("overrides, message", [
    (["method=rigl", "method.updates_per_epoch=2", "method.total_updates=3"], "are both set"),
    (["method=rigl", "method.updates_per_epoch=0"], "method.updates_per_epoch=0.0: expected a positive number"),
    (["method=gmp", "method.total_updates=0"], "method.total_updates=0: expected a positive number"),
    (["method=dpf", "method.frequency=0"], "method.frequency=0: expected a positive number of steps"),
    (["method=set", "method.updates_per_epoch=2"], "protocol=original updates once per epoch"),
])
def test_bad_spacing_is_one_line(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        method_of(*overrides)
