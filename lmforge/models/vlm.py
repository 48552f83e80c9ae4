"""A vision-language model: a vision encoder and a projector in front of the decoder.

- Vision encoder (SigLIP-style): a patch-embedding convolution cuts a square image into
  patches, learned positions are added, pre-norm Transformer blocks attend over every patch
  (no causal mask, no class token), a final LayerNorm.
- Projector: pixel shuffle (space to depth: each r x r group of patches becomes one vector
  r^2 times as wide, so an image takes r^2 fewer tokens), then one linear layer to the
  decoder's width (or a two-layer MLP), as in Idefics3 / SmolVLM.
- Language model: the decoder-only `Decoder`. An image is `image_tokens` copies of the image
  token in the prompt; their embeddings are replaced by the image's projected features, in
  order, and the rest is the decoder's: the KV cache, decoding, the output head.

The model returns logits; images arrive as pixel tensors (see `lmforge.images`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.config import FlopsReport, VisionConfig, VLMConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.layers import KVCache, PagedKVCache, Positions, make_norm
from lmforge.models.decoder import Block, Decoder


class ImageTokenMismatch(LmforgeError, ValueError):
    """The prompt's image tokens and the images given do not match."""


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """3x3 convolutions, each followed by a halving max-pool and doubling the channels, until
    one position covers a patch; then a 1x1 convolution to the encoder's width. A GroupNorm
    after each convolution keeps the activations' scale whatever the image's contrast (from
    nothing it took a third of the steps to leave chance on small text)."""
    halvings = cfg.patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    width = 3
    for i in range(halvings):
        out = cfg.d_model >> (halvings - i)
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.GroupNorm(min(8, out), out),
                   nn.GELU(), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.Conv2d(width, cfg.d_model, 1))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = cfg.block_config()
        self.patch_embed = (conv_stem(cfg) if cfg.stem == "conv" else
                            nn.Conv2d(3, cfg.d_model, cfg.patch_size, stride=cfg.patch_size))
        self.pos_embed = nn.Embedding(cfg.patches, cfg.d_model)
        self.blocks = nn.ModuleList(Block(blocks, causal=False) for _ in range(cfg.n_layer))
        self.norm = make_norm("layernorm", cfg.d_model, cfg.norm_eps, bias=True)

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 4 and self.cfg.stem == "conv":
                # a stack of convolutions needs variance-keeping weights, or the signal
                # fades layer by layer
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, self.cfg.init_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features (N, patches, d_model) of images (N, 3, size, size)."""
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"images of {tuple(pixels.shape[-2:])} pixels; this encoder reads "
                             f"{self.cfg.image_size} x {self.cfg.image_size}")
        if self.cfg.per_image_norm:
            pixels = pixels - pixels.mean(dim=(2, 3), keepdim=True)
            pixels = pixels / (pixels.std(dim=(1, 2, 3), keepdim=True) + 1e-2)
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (N, patches, d), row-major
        x = x + self.pos_embed.weight
        pos = Positions.of(0, x.shape[1])
        for block in self.blocks:
            x = block(x, None, pos, None, None)
        return self.norm(x)


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, s*s, d) patch features -> (N, s*s / r^2, d * r^2): each r x r group of patches
    becomes one vector (Idefics3's order, so its projector weights apply as they are)."""
    n, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.view(n, side, side // r, d * r)  # r neighbours along a row side by side
    x = x.permute(0, 2, 1, 3).reshape(n, side // r, side // r, d * r * r)  # and r rows
    return x.permute(0, 2, 1, 3).reshape(n, seq // (r * r), d * r * r)


class Projector(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.r = cfg.scale_factor
        width = cfg.vision.d_model * cfg.scale_factor ** 2
        mlp = cfg.projector == "mlp"
        self.up = nn.Linear(width, cfg.text.d_model, bias=False) if mlp else None
        self.proj = nn.Linear(cfg.text.d_model if mlp else width, cfg.text.d_model, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image features (N, image_tokens, text width) from patch features."""
        x = pixel_shuffle(features, self.r)
        if self.up is not None:
            x = F.gelu(self.up(x), approximate="tanh")
        return self.proj(x)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg)
        self.text = Decoder(cfg.text)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.vision.reset_parameters()
        for p in self.projector.parameters():
            nn.init.normal_(p, 0.0, self.cfg.vision.init_std)

    def tie_weights(self) -> None:
        self.text.tie_weights()

    def reset_buffers(self) -> None:
        self.text.reset_buffers()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, image_tokens, text width) of images (N, 3, size, size)."""
        return self.projector(self.vision(images))

    def embed(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, width) with the image tokens' replaced by the images'
        `features` (N, image_tokens, width): the first image fills the first image_tokens
        image tokens, and so on."""
        slots = tokens == self.cfg.image_token_id
        wanted = int(slots.sum())
        given = features.shape[0] * self.cfg.image_tokens
        if wanted != given:
            raise ImageTokenMismatch(
                f"the prompt has {wanted} image tokens and {features.shape[0]} image(s) were "
                f"given, which take {given} ({self.cfg.image_tokens} each): give one image per "
                "image placeholder")
        x = self.text.token_embeddings(tokens)
        return x.masked_scatter(slots.unsqueeze(-1), features.to(x.dtype))

    def image_words(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) of the tokens each image calls up: the decoder's output head on
        the largest value of each feature over the image's tokens. Trained to name the tokens
        of the answers about an image (`vision_aux`), the encoder learns to see what the
        answers speak of before the decoder has learned where to look (SuperClass's
        objective, with the head the decoder already has)."""
        return self.text.lm_head(self.text.final_norm(features.amax(1)))

    def image_columns(self, patches: torch.Tensor) -> torch.Tensor:
        """Logits (N, columns, vocab) of the tokens each column of an image's patches calls
        up, left to right: the decoder's output head on the largest value of each feature
        over the column, where a patch's feature is its share of its image token's (the
        projector's columns that read it; a linear projector only)."""
        if self.projector.up is not None:
            raise ConfigError("vision_aux_columns needs a linear projector, not an mlp one")
        r, (n, seq, d) = self.cfg.scale_factor, patches.shape
        side = math.isqrt(seq)
        groups = patches.view(n, side // r, r, side // r, r, d)
        weight = self.projector.proj.weight.view(-1, r, r, d)  # pixel_shuffle's order
        shares = torch.einsum("nIaJbd,eabd->nIaJbe", groups, weight)
        columns = shares.reshape(n, side, side, -1).amax(1)
        return self.text.lm_head(self.text.final_norm(columns))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, last_only: bool = False,
                select: torch.Tensor | None = None, images: torch.Tensor | None = None,
                image_words: str | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for tokens (B, T), with `images` (N, 3, size, size) in place of
        the image tokens (see `embed`); the decoder's arguments otherwise. `image_words` also
        returns, from the same features, the images' `image_words` logits ("pooled") or
        their `image_columns` logits ("columns")."""
        if image_words not in (None, "pooled", "columns"):
            raise ValueError(f"image_words is 'pooled' or 'columns', not {image_words!r}")
        if images is None:
            if image_words:
                raise ValueError("image_words needs images")
            return self.text(tokens, cache, start, last_only, select)
        patches = self.vision(images.to(self.text.final_norm.weight.dtype))
        features = self.projector(patches)
        logits = self.text(tokens, cache, start, last_only, select, self.embed(tokens, features))
        if image_words == "columns":
            return logits, self.image_columns(patches)
        return (logits, self.image_words(features)) if image_words else logits

    def new_cache(self, batch: int, length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        return self.text.new_cache(batch, length, dtype)

    def new_paged_cache(self, slots: int, length: int, block: int, blocks: int = 0,
                        dtype: torch.dtype | None = None) -> PagedKVCache:
        return self.text.new_paged_cache(slots, length, block, blocks, dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self) -> FlopsReport:
        """The decoder's FLOPs per text token; in `extra`, each part's parameters and
        training FLOPs (forward + backward): the vision encoder's and the projector's per
        image, the decoder's per token."""
        text = self.text.flops()
        vision = sum(p.numel() for p in self.vision.parameters())
        projector = sum(p.numel() for p in self.projector.parameters())
        v, patches = self.cfg.vision, self.cfg.vision.patches
        # 6 per weight per patch (the learned positions are a lookup), plus attention over
        # every patch (count_flops's term, with all patches as the context).
        per_patch = 6 * (vision - self.vision.pos_embed.weight.numel()) \
            + 12 * v.n_layer * v.d_model * patches
        extra = {"vision_params": vision, "vision_flops_per_image": patches * per_patch,
                 "projector_params": projector,
                 "projector_flops_per_image": 6 * projector * self.cfg.image_tokens,
                 "text_params": text.params, "text_flops_per_token": text.flops_per_token}
        return FlopsReport(text.params + vision + projector,
                           text.non_embedding_params + vision + projector,
                           text.flops_per_token, extra)
