"""The UNet as the pair that feature caching across steps needs (DeepCache, Ma et al. 2023, arXiv:2312.00858).

A UNet is a chain of skip producers, P_0 = conv_in, then each down block's layers (resnet and attention) and
its downsampler, and of consumers in reverse, C_M ... C_0, where C_j concatenates P_j's output to its input
(each up block's layers, an upsampler after each up block's last). The *branch* b cuts it: the deep UNet is the
whole UNet and also returns the hidden state entering C_b (the deep feature); the shallow UNet computes only
P_0..P_b, takes a cached deep feature for C_b's input and runs C_b..C_0 and the output head. Fed the feature
that the deep UNet computed from the same inputs, the shallow UNet returns the deep UNet's output exactly.

For SD1.x/SD2.x layouts (two layers per block) the branch is DeepCache's ``cache_branch_id`` (block * 3 +
layer): branch 0 keeps conv_in and the last up layer, as DeepCacheSDHelper's default does.
"""

from __future__ import annotations

import torch

DEEP = "unet_deep"          # component names in the engine directory
SHALLOW = "unet_shallow"
FEATURE = "deep_feature"    # the deep UNet's extra output, the shallow UNet's extra input


def _producers(unet) -> list:
    """P_1..P_M: each a function (hidden, emb, context) -> hidden whose output is a skip connection."""
    out = []
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attentions):
            out.append(_layer(resnet, attn))
        for down in block.downsamplers or []:
            out.append(lambda h, emb, ctx, down=down: down(h))
    return out


def _consumers(unet) -> list:
    """C_M..C_0 in the order they run: (layer function, the upsampler that follows it or None)."""
    out = []
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        layers = list(zip(block.resnets, attentions))
        for i, (resnet, attn) in enumerate(layers):
            last = i == len(layers) - 1
            up = block.upsamplers[0] if last and block.upsamplers else None
            out.append((_layer(resnet, attn), up))
    return out


def _layer(resnet, attn):
    def run(h, emb, ctx):
        h = resnet(h, emb)
        return attn(h, encoder_hidden_states=ctx, return_dict=False)[0] if attn is not None else h
    return run


def branch_count(unet) -> int:
    """How many branches the UNet has: one per skip connection (0 .. count - 1)."""
    return 1 + len(_producers(unet))


def branch_count_from_config(config: dict) -> int:
    """:func:`branch_count` from the UNet's config.json alone: conv_in, each down block's layers, and a
    downsampler after every down block but the last (UNet2DConditionModel's layout)."""
    blocks = len(config["down_block_types"])
    layers = config.get("layers_per_block", 2)
    layers = [layers] * blocks if isinstance(layers, int) else list(layers)
    return 1 + sum(layers) + blocks - 1


class _CachedUNet(torch.nn.Module):
    """What both graphs share: the embeddings (as UNet2DConditionModel.forward computes them), the producers
    up to the branch, the consumers from it, and the output head."""

    def __init__(self, unet, branch: int, extra: tuple[str, ...] = ()):
        super().__init__()
        count = branch_count(unet)
        if not 0 <= branch < count:
            raise ValueError(f"branch {branch}: this UNet has branches 0 to {count - 1}")
        if getattr(unet.config, "addition_embed_type", None) == "image_hint" or unet.config.center_input_sample:
            raise ValueError("feature caching supports text-conditioned UNets (no image hint, no centred input)")
        self.unet = unet
        self.branch = branch
        self.extra = tuple(extra)
        self._producers = _producers(unet)
        self._consumers = _consumers(unet)

    def _embed(self, sample, timestep, context, extra):
        u = self.unet
        kw = dict(zip(self.extra, extra))
        added = {k: kw[k] for k in ("text_embeds", "time_ids") if k in kw} or None
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), kw.get("timestep_cond"))
        class_emb = u.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        context = u.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        return emb, context

    def _skips(self, sample, emb, context, upto: int) -> list:
        h = self.unet.conv_in(sample)
        skips = [h]
        for produce in self._producers[:upto]:
            h = produce(h, emb, context)
            skips.append(h)
        return skips

    def _consume(self, h, skips, emb, context, high: int, low: int, sample):
        """Run consumers C_high..C_low (in that order) on ``h``."""
        # diffusers gives the upsamplers the skip's size only when the sample is not a multiple of the total
        # upsampling factor (then the traced graph takes every size); otherwise they double
        odd = any(d % 2 ** self.unet.num_upsamplers for d in sample.shape[-2:])
        count = len(self._consumers)
        for j in range(high, low - 1, -1):
            layer, up = self._consumers[count - 1 - j]
            h = layer(torch.cat([h, skips[j]], dim=1), emb, context)
            if up is not None:
                h = up(h, skips[j - 1].shape[2:] if odd else None)
        return h

    def _head(self, h):
        u = self.unet
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


class DeepUNetGraph(_CachedUNet):
    """The whole UNet: -> (out_sample, deep_feature), the hidden state entering consumer C_branch."""

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        emb, context = self._embed(sample, timestep, encoder_hidden_states, extra)
        skips = self._skips(sample, emb, context, len(self._producers))
        u = self.unet
        h = skips[-1]
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=context)
            else:
                h = u.mid_block(h, emb)
        feature = self._consume(h, skips, emb, context, len(self._consumers) - 1, self.branch + 1, sample)
        out = self._consume(feature, skips, emb, context, self.branch, 0, sample)
        return self._head(out), feature


class ShallowUNetGraph(_CachedUNet):
    """The shallow UNet: the UNet's inputs and a cached deep feature -> out_sample."""

    def forward(self, sample, timestep, encoder_hidden_states, *extra_and_feature):
        *extra, feature = extra_and_feature
        emb, context = self._embed(sample, timestep, encoder_hidden_states, extra)
        skips = self._skips(sample, emb, context, self.branch)
        return self._head(self._consume(feature, skips, emb, context, self.branch, 0, sample))
