"""Host syncs on the scale path: a step never reads a device value (on CUDA it never waits for the GPU);
the host reads the non-finite streak and the ranks agree to go on only at sync steps (runtime.sync_step).
The CPU runs the same path as CUDA (fused AdamW, the skip on the device), so it is tested here."""
import argparse

import pytest
import torch

import runtime
import train
from test_train import tiny, without


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    args = argparse.Namespace(lr=1e-2, wd=0.1, beta2=0.98)
    optimizer = train.build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def backward(model, poison: bool = False) -> None:
    loss = model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).square().sum()
    (loss * float("nan") if poison else loss).backward()


def test_deferred_update_reads_nothing_on_the_host_and_skips_on_the_device(monkeypatch):
    model, optimizer, scheduler = model_and_optimizer()
    backward(model)

    def no_host_read(*_):
        raise AssertionError("a host read of a device value")
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__"):
            patch.setattr(torch.Tensor, name, no_host_read)
        finite = train.adamw_update(model, optimizer, scheduler, 1.0)
    assert finite.dtype == torch.bool and bool(finite)
    after_good = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    optimizer.zero_grad()
    backward(model, poison=True)
    finite = train.adamw_update(model, optimizer, scheduler, 1.0)
    assert not bool(finite)
    assert all(torch.equal(a, p) for a, p in zip(after_good, model.parameters()))      # no update
    assert all(torch.equal(v, optimizer.state[next(model.parameters())][k]) for k, v in state.items())  # step too


def test_update_on_finite_gradients_is_plain_clipped_adamw():
    """The device-side skip costs nothing when nothing is skipped: the update is bitwise that of
    clip_grad_norm_ + AdamW.step without found_inf."""
    skipping, optimizer_s, scheduler_s = model_and_optimizer()
    plain, optimizer_p, _ = model_and_optimizer()
    for _ in range(3):
        optimizer_s.zero_grad()
        backward(skipping)
        train.adamw_update(skipping, optimizer_s, scheduler_s, 1.0)
        optimizer_p.zero_grad()
        backward(plain)
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer_p.step()
    for a, b in zip(skipping.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_sync_steps_are_the_first_and_those_ending_in_a_log_save_eval_or_the_run():
    args = argparse.Namespace(log_every=10, save_every=25, eval_every=0)
    syncs = [s + 1 for s in range(3, 60) if runtime.sync_step(s, 3, 60, args)]
    assert syncs == [4, 10, 20, 25, 30, 40, 50, 60]


def test_training_agrees_and_reads_the_streak_only_at_sync_steps(tmp_path, monkeypatch):
    """12 steps, a log line every 5 -> agreements and streak reads at steps 1, 5, 10, 12 only."""
    calls = {"agree": [], "check": []}
    real_take, real_check = runtime.StepBatches.take, runtime.NonFiniteSteps.check
    monkeypatch.setattr(runtime.StepBatches, "take",
                        lambda self, count, agree: (calls["agree"].append(agree), real_take(self, count, agree))[1])
    monkeypatch.setattr(runtime.NonFiniteSteps, "check",
                        lambda self, env, step: (calls["check"].append(step), real_check(self, env, step)))
    argv = without(tiny(tmp_path, "--mode", "clip", "--steps", "12", "--eval-data", "none", "--save-every", "12"),
                   "--log-every") + ["--log-every", "5"]
    train.main(argv)
    assert calls["check"] == [1, 5, 10, 12]
    assert [i + 1 for i, agree in enumerate(calls["agree"]) if agree] == [1, 5, 10, 12] and len(calls["agree"]) == 12


@pytest.mark.parametrize("argv,message", [
    (["--accum-freq", "0"], "--accum-freq 0: expected a value in [1, inf)"),
    (["--mode", "supervised", "--accum-freq", "2"], "--accum-freq and --grad-checkpointing apply to the contrastive"),
    (["--mode", "supervised", "--grad-checkpointing"], "--accum-freq and --grad-checkpointing apply to the contrastive"),
])
def test_bad_scale_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
