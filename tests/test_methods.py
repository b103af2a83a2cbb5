"""Method presets: the factor/dense learning-rate ratio reaches the right group and the schedule."""

import pytest
import torch

from lowrank.methods import apply_method, build_controller, build_optimizer, load_method
from lowrank.methods.presets import preset_path
from lowrank.errors import UsageError
from tiny_models import build


@pytest.mark.parametrize("preset", ["low_rank_restarts", "galore"])
def test_matrix_lr_ratio_scales_only_the_matrix_group(preset):
    overrides = {"optimizer.matrix_lr_ratio": 0.25}
    if preset == "low_rank_restarts":
        overrides["lowrank.rank"] = 4
    else:
        overrides["optimizer.matrix.rank"] = 4
    method = load_method(preset, overrides)
    model = apply_method(build("llama"), method)
    optimizer = build_optimizer(model, method)
    lr = float(method.optimizer["lr"])
    groups = {g["group_name"]: g for g in optimizer.param_groups}
    controller = build_controller(model, optimizer, method, total_steps=100)
    multiplier = controller.lr_lambda(0)
    assert groups["matrix"]["lr"] == pytest.approx(0.25 * lr * multiplier)
    assert groups["other"]["lr"] == pytest.approx(lr * multiplier)
    for _ in range(30):  # the schedule keeps the ratio at every step
        controller.step()
    assert groups["matrix"]["lr"] / groups["other"]["lr"] == pytest.approx(0.25)


def test_matrix_lr_ratio_default_is_one_and_is_validated():
    method = load_method("galore", {"optimizer.matrix.rank": 4})  # a preset that does not set it
    assert "matrix_lr_ratio" not in preset_path("galore").read_text()
    optimizer = build_optimizer(apply_method(build("llama"), method), method)
    assert len({g["lr"] for g in optimizer.param_groups}) == 1
    # one that does (low_rank, from cpu-long's search): the factors at lr × ratio, the rest at lr
    method = load_method("low_rank", {"lowrank.rank": 4})
    lrs = {g["group_name"]: g["lr"] for g in build_optimizer(apply_method(build("llama"), method), method).param_groups}
    assert lrs == {"matrix": pytest.approx(method.optimizer.lr * method.optimizer.matrix_lr_ratio),
                   "other": method.optimizer.lr}
    assert method.optimizer.matrix_lr_ratio != 1.0
    with pytest.raises(UsageError, match="matrix_lr_ratio"):
        load_method("low_rank", {"optimizer.matrix_lr_ratio": -1})
