"""A tiny SeeSR checkpoint written the way SeeSR's own code lays it out, and SeeSR's equations.

Nothing here uses ``megasr_core.models.seesr``: the image transformers are built with the
arguments SeeSR's block classes pass (``models/unet_2d_blocks.py``: one ``Transformer2DModel``
per text transformer, ``num_attention_heads`` heads of ``channels // heads``, the block's norm
groups and projection, 512-wide keys in SeeSR, RAM's width here), saved under SeeSR's key names
with ``use_image_cross_attention: true`` in ``config.json``. :func:`reference_noise` recomputes
SeeSR's ControlNet and UNet forwards block by block from those modules, so a test can hold the
hook-based :class:`SeeSRDenoiser` to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import save_file

from megasr_core.models import get_preset

TINY = get_preset("tiny")
RAM_WIDTH = TINY.extra["ram_embed_dim"]


def _blocks(model) -> list[tuple[str, torch.nn.Module]]:
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)] + [("mid_block", model.mid_block)]
    return blocks + [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", []))]


def seesr_image_attentions(model, width: int) -> dict[str, list[Transformer2DModel]]:
    """SeeSR's image transformers for every block with text transformers, by block name."""
    made = {}
    for name, block in _blocks(model):
        texts = getattr(block, "attentions", None)
        if not texts:
            continue
        made[name] = [
            Transformer2DModel(
                text.config.num_attention_heads,
                text.config.attention_head_dim,
                in_channels=text.config.in_channels,
                num_layers=text.config.num_layers,
                cross_attention_dim=width,
                norm_num_groups=text.config.norm_num_groups,
                use_linear_projection=text.config.use_linear_projection,
                upcast_attention=text.config.upcast_attention,
            ).eval()
            for text in texts
        ]
    return made


def _randomize(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


def tiny_networks(seed: int = 0):
    """A tiny SD2-shaped UNet and its ControlNet with every weight nonzero (zero convs too)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY.unet).eval()
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=TINY.controlnet_conditioning_channels
    ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize(controlnet, generator)
    return unet, controlnet


def write_seesr_release(
    directory: Path,
    seed: int = 0,
    width: int = RAM_WIDTH,
    weights_format: str = "safetensors",
    unet: UNet2DConditionModel | None = None,
) -> Path:
    """``directory/unet`` and ``directory/controlnet`` as SeeSR's training script saves them."""
    base_unet, controlnet = tiny_networks(seed)
    unet = unet or base_unet
    generator = torch.Generator().manual_seed(seed + 2)
    for net_name, net in (("unet", unet), ("controlnet", controlnet)):
        state = dict(net.state_dict())
        for block, images in seesr_image_attentions(net, width).items():
            for index, image in enumerate(images):
                _randomize(image, generator)
                state.update({f"{block}.image_attentions.{index}.{k}": v for k, v in image.state_dict().items()})
        folder = directory / net_name
        net.save_config(folder)
        config = json.loads((folder / "config.json").read_text())
        config["use_image_cross_attention"] = True
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.contiguous() for k, v in state.items()}
        if weights_format == "bin":
            torch.save(tensors, folder / "diffusion_pytorch_model.bin")
        else:
            save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return directory


def load_release_for_reference(directory: Path):
    """The release's networks without any hook: plain diffusers models + image transformers by block."""
    from megasr_core.weights.files import read_model_dir

    nets = {}
    for name, cls in (("unet", UNet2DConditionModel), ("controlnet", ControlNetModel)):
        config = {k: v for k, v in cls.load_config(directory / name).items() if k != "use_image_cross_attention"}
        net = cls.from_config(config).eval()
        state = read_model_dir(directory / name)
        net.load_state_dict({k: v for k, v in state.items() if ".image_attentions." not in k}, strict=True)
        width = next(
            v.shape[1]
            for k, v in state.items()
            if k.endswith("image_attentions.0.transformer_blocks.0.attn2.to_k.weight")
        )
        images = seesr_image_attentions(net, width)
        for block, modules in images.items():
            for index, module in enumerate(modules):
                prefix = f"{block}.image_attentions.{index}."
                module.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
                )
        nets[name] = (net, images)
    return nets


# ---------------------------------------------------------------------------- SeeSR's equations
def _embed_time(net, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    steps = timestep.expand(batch) if timestep.ndim else timestep.repeat(batch)
    return net.time_embedding(net.time_proj(steps).to(dtype))


def _attend(block, index: int, images, h, text, ram):
    h = block.attentions[index](h, encoder_hidden_states=text, return_dict=False)[0]
    return images[index](h, encoder_hidden_states=ram, return_dict=False)[
        0
    ]  # SeeSR: the image transformer after the text one


def _down(block, name, images, h, emb, text, ram):
    outputs = ()
    for index, resnet in enumerate(block.resnets):
        h = resnet(h, emb)
        if getattr(block, "attentions", None):
            h = _attend(block, index, images[name], h, text, ram)
        outputs += (h,)
    for downsampler in block.downsamplers or []:
        h = downsampler(h)
        outputs += (h,)
    return h, outputs


def _mid(block, images, h, emb, text, ram):
    h = block.resnets[0](h, emb)
    for index, resnet in enumerate(block.resnets[1:]):
        h = resnet(_attend(block, index, images["mid_block"], h, text, ram), emb)
    return h


def _up(block, name, images, h, skips, emb, text, ram):
    for index, resnet in enumerate(block.resnets):
        h, skips = torch.cat([h, skips[-1]], dim=1), skips[:-1]
        h = resnet(h, emb)
        if getattr(block, "attentions", None):
            h = _attend(block, index, images[name], h, text, ram)
    for upsampler in block.upsamplers or []:
        h = upsampler(h)
    return h


def reference_noise(nets, latents, timestep, text, ram, control, scale: float = 1.0) -> torch.Tensor:
    """ε from SeeSR's ControlNet forward, then its UNet forward with the ControlNet's residuals."""
    controlnet, cn_images = nets["controlnet"]
    unet, unet_images = nets["unet"]
    batch = latents.shape[0]
    emb = _embed_time(controlnet, timestep, batch, latents.dtype)
    h = controlnet.conv_in(latents) + controlnet.controlnet_cond_embedding(control)
    residuals = (h,)
    for index, block in enumerate(controlnet.down_blocks):
        h, outputs = _down(block, f"down_blocks.{index}", cn_images, h, emb, text, ram)
        residuals += outputs
    h = _mid(controlnet.mid_block, cn_images, h, emb, text, ram)
    down = [conv(r) * scale for r, conv in zip(residuals, controlnet.controlnet_down_blocks)]
    mid = controlnet.controlnet_mid_block(h) * scale

    emb = _embed_time(unet, timestep, batch, latents.dtype)
    h = unet.conv_in(latents)
    skips = (h,)
    for index, block in enumerate(unet.down_blocks):
        h, outputs = _down(block, f"down_blocks.{index}", unet_images, h, emb, text, ram)
        skips += outputs
    skips = tuple(s + d for s, d in zip(skips, down))
    h = _mid(unet.mid_block, unet_images, h, emb, text, ram) + mid
    for index, block in enumerate(unet.up_blocks):
        count = len(block.resnets)
        h = _up(block, f"up_blocks.{index}", unet_images, h, skips[-count:], emb, text, ram)
        skips = skips[:-count]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
