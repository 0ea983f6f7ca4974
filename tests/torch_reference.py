"""An independent PyTorch implementation of LUT's forward pass, for parity tests.

Written from the method description (docs/method.md, "The method"), not from lut_jax: its
own sin-cos table, patchify in NCHW, masking from given noise, the MAE decoder, the heads as
``nn.Sequential`` with ``BatchNorm1d`` and the losses. The transformer parts are timm's
``PatchEmbed`` and ``Block`` (as in the reference), so its ``state_dict`` uses the reference
names (``blocks.0.attn.qkv.weight``, ``head.1.running_mean``, ...).

Only the test-suite imports this module (it needs torch and timm).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed


def sincos_table(width: int, grid: int) -> np.ndarray:
  """``(1 + grid**2, width)`` float32: a zero row for cls, then one row per patch in
  row-major order. Per patch: ``[sin(col w), cos(col w), sin(row w), cos(row w)]`` with
  ``w_k = 10000 ** (-k / (width / 4))``, ``k < width / 4``."""
  quarter = width // 4
  freqs = np.array([10000.0 ** (-k / quarter) for k in range(quarter)], np.float64)
  table = np.zeros((1 + grid * grid, width), np.float64)
  for index in range(grid * grid):
    row, col = divmod(index, grid)
    table[1 + index] = np.concatenate([np.sin(col * freqs), np.cos(col * freqs),
                                       np.sin(row * freqs), np.cos(row * freqs)])
  return table.astype(np.float32)


def patchify_nchw(images: torch.Tensor, patch: int) -> torch.Tensor:
  """``(N, C, H, W)`` -> ``(N, L, p*p*C)``, pixels inside a patch ordered (row, col, chan)."""
  n, c, h, w = images.shape
  x = images.reshape(n, c, h // patch, patch, w // patch, patch)
  x = x.permute(0, 2, 4, 3, 5, 1)  # n, gh, gw, p, q, c
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def masks_from_noise(noise: torch.Tensor, mask_ratio: float):
  """Returns ``(keep1, keep2, ids_restore, mask1, mask2)``: view 1 keeps the ``keep``
  lowest-noise patches, view 2 the next ``keep``; masks are 1 on hidden patches."""
  n, length = noise.shape
  keep = int(length * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  keep1, keep2 = ids_shuffle[:, :keep], ids_shuffle[:, keep:2 * keep]
  mask1 = torch.ones(n, length)
  mask1.scatter_(1, keep1, 0.0)
  mask2 = torch.ones(n, length)
  mask2.scatter_(1, keep2, 0.0)
  return keep1, keep2, ids_restore, mask1, mask2


def build_head(depth: int, in_dim: int, hidden: int, out_dim: int, norm: str,
               activation: str) -> nn.Module:
  """Bias-free MLP as ``nn.Sequential``: Linear, [Norm], Act, ..., Linear."""
  if depth == 0:
    return nn.Identity()
  layers: list[nn.Module] = []
  for i in range(depth):
    last = i == depth - 1
    layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden,
                            bias=False))
    if not last:
      if norm == "batch":
        layers.append(nn.BatchNorm1d(hidden))
      elif norm == "layer":
        layers.append(nn.LayerNorm(hidden))
      layers.append(nn.ReLU() if activation == "relu" else nn.GELU())
  return nn.Sequential(*layers)


class TorchLUT(nn.Module):
  """LUT online network (or plain MAE with ``use_bc=False``) in PyTorch."""

  def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
               depth: int, num_heads: int, decoder_embed_dim: int, decoder_depth: int,
               decoder_num_heads: int, mlp_ratio: float = 4.0, use_bc: bool = True,
               head_depth: int = 2, pred_depth: int = 2, head_hidden_dim: int = 4096,
               head_norm: str = "batch", head_activation: str = "relu"):
    super().__init__()
    self.patch = patch_size
    grid = img_size // patch_size
    self.num_patches = grid * grid
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    self.register_buffer("pos_embed", torch.from_numpy(sincos_table(embed_dim, grid))[None])
    self.blocks = nn.Sequential(*[
        Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * 0.02)
    self.register_buffer("decoder_pos_embed",
                         torch.from_numpy(sincos_table(decoder_embed_dim, grid))[None])
    self.decoder_blocks = nn.Sequential(*[
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
              norm_layer=norm_layer) for _ in range(decoder_depth)])
    self.decoder_norm = norm_layer(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
    self.use_bc = use_bc
    if use_bc:
      self.head = build_head(head_depth, embed_dim, head_hidden_dim, embed_dim, head_norm,
                             head_activation)
      self.predictor = build_head(pred_depth, embed_dim, head_hidden_dim, embed_dim,
                                  head_norm, head_activation)

  def encode(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens ``(N, 1 + kept, D)`` of the patches in ``keep`` (all when None), cls first."""
    x = self.patch_embed(images) + self.pos_embed[:, 1:]
    if keep is not None:
      x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = self.blocks(torch.cat([cls, x], dim=1))
    return self.norm(x)

  def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(latent)
    n, kept, width = x.shape[0], x.shape[1] - 1, x.shape[2]
    filler = self.mask_token.expand(n, self.num_patches - kept, -1)
    shuffled = torch.cat([x[:, 1:], filler], dim=1)
    patches = torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, width))
    x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
    x = self.decoder_norm(self.decoder_blocks(x))
    return self.decoder_pred(x)[:, 1:]

  def forward_mae(self, images: torch.Tensor, keep: torch.Tensor,
                  ids_restore: torch.Tensor) -> torch.Tensor:
    """Pixel prediction ``(N, L, p*p*C)`` of a masked view."""
    return self.decode(self.encode(images, keep), ids_restore)

  def forward_student(self, view1, view2, keep1, keep2, ids_restore) -> dict:
    """Masked views -> ``pred`` (view 1) and predictor outputs ``q1``, ``q2``; each view goes
    through the heads separately (BatchNorm statistics per view, view 1 first)."""
    latent1, latent2 = self.encode(view1, keep1), self.encode(view2, keep2)
    pred = self.decode(latent1, ids_restore)
    q1 = self.predictor(self.head(latent1[:, 1:].mean(dim=1)))
    q2 = self.predictor(self.head(latent2[:, 1:].mean(dim=1)))
    return {"pred": pred, "q1": q1, "q2": q2}

  @torch.no_grad()
  def forward_teacher(self, view1, view2):
    """Unmasked views -> projector outputs; call on a copy in ``eval()`` mode."""
    z1 = self.head(self.encode(view1)[:, 1:].mean(dim=1))
    z2 = self.head(self.encode(view2)[:, 1:].mean(dim=1))
    return z1, z2


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
                        patch: int, norm_pix: bool = True) -> torch.Tensor:
  """Per-patch MSE against (normalised) pixels, averaged over hidden patches."""
  target = patchify_nchw(images, patch)
  if norm_pix:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # torch default: unbiased
    target = (target - mean) / torch.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(dim=-1)
  return (per_patch * mask).sum() / mask.sum()


def bc_loss(q1, q2, z1, z2) -> torch.Tensor:
  """Symmetric cross-view ``2 - 2 cos``: (q1 vs z2) and (q2 vs z1), batch means averaged."""
  def distance(q, z):
    return (2 - 2 * (F.normalize(q, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(-1)).mean()
  return (distance(q1, z2) + distance(q2, z1)) / 2


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
  """Gives every parameter and BatchNorm running statistic non-trivial random values, so
  a parity test cannot pass by accident of zero biases, unit norms or fresh statistics."""
  with torch.no_grad():
    for name, param in module.named_parameters():
      if name.endswith("weight") and param.ndim == 1:  # norm scales around 1
        param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
      elif param.ndim == 1 or name.endswith("token"):
        param.copy_(0.2 * torch.randn(param.shape, generator=generator))
      else:
        fan_in = int(np.prod(param.shape[1:]))
        param.copy_(torch.randn(param.shape, generator=generator) / np.sqrt(fan_in))
    for sub in module.modules():
      if isinstance(sub, nn.BatchNorm1d):
        sub.running_mean.copy_(0.3 * torch.randn(sub.num_features, generator=generator))
        sub.running_var.copy_(0.5 + torch.rand(sub.num_features, generator=generator))
        sub.num_batches_tracked.fill_(7)
