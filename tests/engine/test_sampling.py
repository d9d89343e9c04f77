"""The rectified-flow sampler against the schedule values of architecture notes 2.8."""
import pytest
import torch

from engine.sampling import (GenerationCancelled, classifier_free_guidance, euler_step, flow_match_schedule,
                             initial_noise, make_generator, sample)


@pytest.mark.parametrize("steps, shift, first3, last_t, last_sigma", [
    (50, 6.0, (1000.0, 996.56, 993.00), 34.78, 0.0348),
    (30, 6.0, (1000.0, 994.12, 987.88), 34.78, 0.0348),
    (15, 8.0, (1000.0, 990.56, 979.78), 60.21, 0.0602),
])
def test_schedule_table(steps, shift, first3, last_t, last_sigma):
    schedule = flow_match_schedule(steps, shift)
    assert schedule.steps == steps and schedule.sigmas.numel() == steps + 1
    assert schedule.timesteps.dtype == torch.float32 and schedule.sigmas.dtype == torch.float32
    for got, want in zip(schedule.timesteps[:3].tolist(), first3):
        assert abs(got - want) < 0.006
    assert abs(schedule.timesteps[-1].item() - last_t) < 0.006
    assert abs(schedule.sigmas[-2].item() - last_sigma) < 5e-5
    assert schedule.sigmas[-1].item() == 0.0
    assert torch.all(schedule.sigmas[1:] < schedule.sigmas[:-1])
    assert torch.allclose(schedule.timesteps, schedule.sigmas[:-1] * 1000)


def test_model_timestep_is_fp16_rounded():
    schedule = flow_match_schedule(50, 6.0)
    t = schedule.model_timestep(1)
    assert t.shape == (1,)
    # 996.56 in fp16 (spacing 0.5 above 512) is 996.5
    assert t.item() == 996.5
    assert t.item() == schedule.timesteps[1].half().item()
    assert schedule.model_timestep(49).item() == torch.tensor(34.78, dtype=torch.float16).item()


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        flow_match_schedule(0, 6.0)
    with pytest.raises(ValueError):
        flow_match_schedule(10, 0.0)


def test_euler_step_dtype_and_value():
    x = torch.tensor([1.0, 2.0], dtype=torch.float16)
    v = torch.tensor([0.5, -1.0], dtype=torch.float16)
    out = euler_step(x, v, torch.tensor(1.0), torch.tensor(0.75))
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.tensor([0.875, 2.25], dtype=torch.float16))


def test_guidance_formula():
    vc, vu = torch.tensor([3.0]), torch.tensor([1.0])
    assert classifier_free_guidance(vc, vu, 7.0).item() == 1.0 + 7.0 * 2.0


def test_seeded_noise_is_repeatable_and_fp16_drawn():
    a = initial_noise((3, 4), make_generator(5), dtype=torch.float32)
    b = initial_noise((3, 4), make_generator(5), dtype=torch.float32)
    c = initial_noise((3, 4), make_generator(6), dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    reference = torch.randn((3, 4), dtype=torch.float16, generator=torch.Generator("cpu").manual_seed(5))
    assert torch.equal(a, reference.float())
    with pytest.raises(ValueError):
        make_generator(-1)


def test_sample_linear_flow_reaches_data():
    # For x_t = s*noise + (1-s)*x0 the exact velocity is noise - x0; Euler is exact for it.
    x0 = torch.tensor([0.25, -0.5, 1.0], dtype=torch.float64)
    noise = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    seen_batches = []

    def model_fn(x, t):
        seen_batches.append(x.shape[0])
        return (noise - x0).expand_as(x).clone()

    result = sample(model_fn, noise, flow_match_schedule(12, 6.0), guidance=0.0)
    assert torch.allclose(result, x0, atol=1e-6)
    assert set(seen_batches) == {1}


def test_sample_guidance_uses_one_batched_call():
    schedule = flow_match_schedule(4, 6.0)
    calls, timesteps = [], []

    def model_fn(x, t):
        calls.append(tuple(x.shape))
        timesteps.append(t.item())
        assert torch.equal(x[0], x[1])
        return torch.stack([torch.full_like(x[0], 3.0), torch.full_like(x[1], 1.0)])

    progress = []
    out = sample(model_fn, torch.zeros(2, 5), schedule, guidance=7.0, on_step=lambda i, n: progress.append((i, n)))
    assert calls == [(2, 2, 5)] * 4
    assert timesteps == [schedule.model_timestep(i).item() for i in range(4)]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # velocity 1 + 7*(3-1) = 15 over sigma 1 -> 0
    assert torch.allclose(out, torch.full((2, 5), -15.0))


def test_sample_cancel_stops_before_the_next_step():
    count = {"steps": 0}

    def model_fn(x, t):
        count["steps"] += 1
        return torch.zeros_like(x)

    with pytest.raises(GenerationCancelled):
        sample(model_fn, torch.zeros(3), flow_match_schedule(10, 6.0), 7.0,
               should_cancel=lambda: count["steps"] >= 3)
    assert count["steps"] == 3
