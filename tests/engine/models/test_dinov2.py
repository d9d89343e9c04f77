"""DINOv2 with registers: both checkpoint layouts, the Hugging Face reference, token layout, full-size keys."""
import pytest
import torch
import torch.nn.functional as F

from engine.configs import ImageEncoderConfig
from engine.models import build
from engine.models.dinov2 import (DINOv2Encoder, hf_to_original_state_dict, is_hf_dinov2_layout,
                                  load_dinov2_state_dict, original_to_hf_state_dict)

TINY = ImageEncoderConfig(embed_dim=32, depth=2, num_heads=2, patch_size=14, image_size=56, num_register_tokens=4)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def random_original_state_dict(config: ImageEncoderConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    reference = DINOv2Encoder(config)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 + (1.0 if k.endswith(("norm1.weight", "norm2.weight")) else 0.0)
            for k, v in reference.state_dict().items()}


def image(batch: int = 2, size=(56, 56), seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_original_and_hf_layouts_load_and_agree():
    original = random_original_state_dict(TINY)
    hf = original_to_hf_state_dict(original)
    assert not is_hf_dinov2_layout(original) and is_hf_dinov2_layout(hf)
    assert "encoder.layer.1.attention.attention.query.weight" in hf and "embeddings.register_tokens" in hf
    a, b = DINOv2Encoder(TINY).eval(), DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(a, original)
    load_dinov2_state_dict(b, hf)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with torch.no_grad():
        out = a(image())
    assert out.shape == (2, 1 + 4 + 16, 32)
    with torch.no_grad():
        assert torch.equal(out, b(image()))
    # a prefixed HF dict (as saved from a task model) converts to the same tensors
    prefixed = {f"dinov2_with_registers.{k}": v for k, v in hf.items()}
    assert hf_to_original_state_dict(prefixed).keys() == original.keys()


def test_incomplete_state_dicts_are_rejected_except_mask_token():
    hf = original_to_hf_state_dict(random_original_state_dict(TINY))
    del hf["encoder.layer.0.attention.attention.value.bias"]
    with pytest.raises(KeyError):
        load_dinov2_state_dict(DINOv2Encoder(TINY), hf)
    original = random_original_state_dict(TINY)
    del original["blocks.1.ls2.gamma"]
    with pytest.raises(RuntimeError):
        load_dinov2_state_dict(DINOv2Encoder(TINY), original)
    # the training-only mask token may be absent
    original = random_original_state_dict(TINY)
    del original["mask_token"]
    model = DINOv2Encoder(TINY)
    load_dinov2_state_dict(model, original)
    assert torch.equal(model.blocks[1].ls2.gamma, original["blocks.1.ls2.gamma"])


def test_output_is_prenorm_tokens_with_plain_layer_norm():
    model = DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(model, random_original_state_dict(TINY))
    img = image()
    with torch.no_grad():
        prenorm = model.forward_prenorm((img - MEAN) / STD)
        out = model(img)
    torch.testing.assert_close(out, F.layer_norm(prenorm, (32,), eps=1e-5), atol=1e-6, rtol=0)
    # DINO's own final norm has affine parameters that must not be applied
    assert not torch.allclose(out, model.norm(prenorm), atol=1e-3)


def test_center_crop_of_wider_image():
    # the shorter side already has the model size, so Resize is a no-op and CenterCrop takes the middle columns
    model = DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(model, random_original_state_dict(TINY))
    wide = image(1, (56, 84))
    with torch.no_grad():
        torch.testing.assert_close(model(wide), model(wide[..., 14:70]), atol=0, rtol=0)


def test_half_precision_compute_layers_run():
    model = build("image_encoder", config=TINY, dtype=torch.float16)
    load_dinov2_state_dict(model, random_original_state_dict(TINY))
    reference = DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(reference, random_original_state_dict(TINY))
    with torch.no_grad():
        out16, out32 = model(image()), reference(image())
    assert out16.dtype == torch.float16
    assert (out16.float() - out32).abs().max() < 0.1


def test_matches_transformers_reference():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=56, patch_size=14,
        num_register_tokens=4, layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    reference = transformers.Dinov2WithRegistersModel(config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + p.data)
    ours = DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(ours, reference.state_dict())
    # the hub-file names (query/key/value, output.dense) give the same model
    hub_names = DINOv2Encoder(TINY).eval()
    load_dinov2_state_dict(hub_names, original_to_hf_state_dict(ours.state_dict()))

    img = image()
    with torch.no_grad():
        hidden = reference(pixel_values=(img - MEAN) / STD, output_hidden_states=True).hidden_states[-1]
        expected = F.layer_norm(hidden, (32,), eps=1e-5)
        torch.testing.assert_close(ours(img), expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(hub_names(img), expected, atol=2e-5, rtol=0)
        # a 5 x 5 patch grid resamples the 4 x 4 position table (bicubic, antialiased)
        other = (image(1, (70, 70)) - MEAN) / STD
        hidden = reference(pixel_values=other, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(ours.forward_prenorm(other), hidden, atol=2e-5, rtol=0)


def test_full_size_layout_on_meta():
    model = build("image_encoder", device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"cls_token": (1, 1, 1024), "register_tokens": (1, 4, 1024), "pos_embed": (1, 37 * 37 + 1, 1024),
                "mask_token": (1, 1024), "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
                "norm.weight": (1024,), "norm.bias": (1024,)}
    per_block = {"norm1.weight": (1024,), "norm1.bias": (1024,), "attn.qkv.weight": (3072, 1024),
                 "attn.qkv.bias": (3072,), "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
                 "ls1.gamma": (1024,), "norm2.weight": (1024,), "norm2.bias": (1024,),
                 "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,), "mlp.fc2.weight": (1024, 4096),
                 "mlp.fc2.bias": (1024,), "ls2.gamma": (1024,)}
    for block in range(24):
        expected.update({f"blocks.{block}.{k}": v for k, v in per_block.items()})
    assert shapes == expected
