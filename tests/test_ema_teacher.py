"""algorithm.teacher=ema: the EMA teacher, not the student, makes the pseudo-labels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import data_args, read_metrics, train_in_process


class Net(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(5, 11)
        self.bn = torch.nn.BatchNorm1d(5)

    def forward(self, x):
        return {"logits": self.lin(self.bn(x)), "feat": x}


def test_teacher_replaces_only_the_weak_rows_and_takes_no_gradient():
    from aessl.algorithms import EmaTeacher, set_views

    student, teacher = Net(0), Net(1)
    teacher.train()
    model = EmaTeacher(student, SimpleNamespace(module=teacher))
    assert [n for n, _ in model.named_parameters()] == [f"student.{n}" for n, _ in student.named_parameters()]
    x = torch.randn(2 + 3 + 3, 5)
    set_views(SimpleNamespace(model=model), {"x_lb": x[:2], "x_ulb_w": x[2:5], "x_ulb_s": x[5:]})
    out = model(x)["logits"]
    assert teacher.training  # put back as it was
    teacher.eval()
    with torch.no_grad():
        want_weak = teacher(x[2:5])["logits"]
    with torch.no_grad():
        plain = student(x)["logits"]  # train mode, one pass: the same batch statistics
    assert torch.allclose(out[2:5], want_weak)
    assert torch.allclose(out[:2], plain[:2]) and torch.allclose(out[5:], plain[5:])
    assert not torch.allclose(out[2:5], plain[2:5])
    out.sum().backward()
    assert student.lin.weight.grad is not None and teacher.lin.weight.grad is None
    # another shape (an evaluation batch, a separate forward) passes through untouched
    y = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(model(y)["logits"], student(y)["logits"])


@pytest.mark.parametrize("name,args", [("fixmatch", ["p_cutoff=0.0"]),
                                       ("ordinal", ["thresh_min=0.0", "thresh_max=0.0"])])
def test_ema_teacher_trains_and_teaches_something_else(name, args, toy_data, tmp_path):
    """Same seed and batches (two DataLoader workers): with the EMA teacher the weights
    end elsewhere than with the student as its own teacher, or the teacher was never asked."""
    from safetensors.torch import load_file

    weights = {}
    for teacher in ("model", "ema"):
        run = tmp_path / teacher
        assert train_in_process(*data_args(toy_data), "train.steps=3", "train.eval_every=3", "data.num_workers=2",
                                f"algorithm.name={name}", f"algorithm.teacher={teacher}",
                                *[f"algorithm.args.{a}" for a in args], f"output_dir={run}") == 0
        weights[teacher] = load_file(str(run / "model" / "model.safetensors"))
        m = read_metrics(run)[-1]
        assert m["step"] == 3 and np.isfinite(m["qwk"]) and np.isfinite(m["mae"])
    assert any(not torch.equal(weights["model"][k], weights["ema"][k]) for k in weights["model"])


def test_ema_teacher_is_refused_where_it_would_do_nothing(toy_data, tmp_path, capsys):
    run = tmp_path / "mt"
    assert train_in_process(*data_args(toy_data), "train.steps=2", "algorithm.name=meanteacher",
                            "algorithm.teacher=ema", f"output_dir={run}") == 2
    assert "algorithm.teacher" in capsys.readouterr().err
    assert train_in_process(*data_args(toy_data), "train.steps=2", "algorithm.name=fixmatch",
                            "algorithm.teacher=mean", f"output_dir={run}") == 2
    assert "algorithm.teacher" in capsys.readouterr().err
