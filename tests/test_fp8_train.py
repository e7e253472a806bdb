"""FP8 training through the loop's seam (issue #12): ``FP8Training.prepare_model`` converts the model
before the optimizer is built; the run trains, checkpoints and resumes bit-identically."""

from __future__ import annotations

import pytest
import torch

from deepseek_mini import load_config
from deepseek_mini.fp8 import FP8Linear
from deepseek_mini.train import FP8Training, TrainHook, default_hooks, load_checkpoint, train
from tiny import TINY_MOE, run



class OptimizerSpy(TrainHook):
    """Records, after the first step, whether every FP8Linear weight changed (the optimizer stepped it)."""

    name = "spy"

    def prepare_model(self, model):
        self.before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, FP8Linear)}

    def after_optimizer_step(self, model, step):
        if step == 1:
            modules = dict(model.named_modules())
            self.stepped = all(not torch.equal(modules[n].weight, w) for n, w in self.before.items())


def test_fp8_hook_converts_before_the_optimizer_and_the_run_trains(data):
    config = load_config("toy", **TINY_MOE)
    cfg = run(steps=6)
    fp8, spy = FP8Training(), OptimizerSpy()
    result = train(config, cfg, data=data, hooks=[*default_hooks(cfg), fp8, spy])
    fp8_names = sorted(n for n, m in result.model.named_modules() if isinstance(m, FP8Linear))
    assert fp8_names == sorted(fp8.converted) and len(fp8_names) > 0
    assert not any(k in n for n in fp8_names for k in ("embed", "head", "gate"))   # §3.3.1: kept high precision
    assert spy.before.keys() == set(fp8_names) and spy.stepped                       # the optimizer owns their weights
    assert all(p.dtype == torch.float32 for p in result.model.parameters())          # master weights FP32
    losses = result.history["train_loss"]
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 6
    plain = train(config, cfg, data=data)
    assert not any(isinstance(m, FP8Linear) for m in plain.model.modules())
    assert abs(losses[0] - plain.history["train_loss"][0]) < 0.05 * plain.history["train_loss"][0]
    assert losses != plain.history["train_loss"]                                     # FP8 rounding changed the run


def test_an_fp8_run_resumes_bit_identically_and_needs_the_hook(data, tmp_path):
    config = load_config("toy", **TINY_MOE)
    cfg = run(steps=4, checkpoint_every=2, out_dir=str(tmp_path / "a"))
    straight = train(config, cfg, data=data, hooks=[*default_hooks(cfg), FP8Training()])
    midway = tmp_path / "a" / "checkpoint-000002.pt"
    assert load_checkpoint(midway)["hooks"]["fp8"] == {}
    resumed = train(None, run(steps=4, out_dir=str(tmp_path / "b")), data=data, resume=midway,
                    hooks=[*default_hooks(cfg), FP8Training()])
    assert any(isinstance(m, FP8Linear) for m in resumed.model.modules())
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history["train_loss"] == straight.history["train_loss"]
    with pytest.raises(ValueError, match=r"trained with hooks \['fp8', 'moe_balancing', 'mtp'\]"):
        train(None, run(steps=4, out_dir=str(tmp_path / "c")), data=data, resume=midway)


def test_fp8_hook_rejects_a_bad_block():
    with pytest.raises(ValueError, match="block"):
        FP8Training(block=0)


def test_the_fp8_setting_adds_the_hook_and_a_resume_keeps_it(data, tmp_path):
    """``TrainConfig(fp8=True)`` / ``--fp8`` = the default hooks plus FP8Training; a resume may not drop it."""
    from deepseek_mini.train import RESUME_FIXED
    assert [h.name for h in default_hooks(run(fp8=True))][-1] == "fp8"
    assert "fp8" not in [h.name for h in default_hooks(run())] and "fp8" in RESUME_FIXED
    with pytest.raises(ValueError, match="fp8"):
        run(fp8="yes").validate()
    config = load_config("toy", **TINY_MOE)
    out = tmp_path / "run"
    result = train(config, run(steps=2, fp8=True, checkpoint_every=2, out_dir=str(out)), data=data)
    assert any(isinstance(m, FP8Linear) for m in result.model.modules())
    with pytest.raises(ValueError, match="fp8"):
        train(None, run(steps=4, fp8=False, out_dir=str(tmp_path / "b")), data=data,
              resume=out / "checkpoint-000002.pt")
