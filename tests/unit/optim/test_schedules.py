"""A resumed run's learning rate comes from its own schedule, not the one that wrote the checkpoint."""

import math

import torch

from vlhub.optim.schedules import build_scheduler, load_scheduler_state


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def test_a_resume_that_raises_max_steps_takes_the_lr_of_the_new_cosine():
    before = _optimizer()
    schedule = build_scheduler(before, "cosine", warmup_steps=0, max_steps=4)
    for _ in range(2):
        before.step()
        schedule.step()
    assert before.param_groups[0]["lr"] == 0.5  # half-way down a 4-step cosine, by hand
    after = _optimizer()
    after.load_state_dict(before.state_dict())  # the stored lr: the old schedule's
    resumed = build_scheduler(after, "cosine", warmup_steps=0, max_steps=8)
    load_scheduler_state(resumed, schedule.state_dict())
    assert resumed.last_epoch == 2
    assert math.isclose(after.param_groups[0]["lr"], 0.5 * (1 + math.cos(math.pi * 2 / 8)))
