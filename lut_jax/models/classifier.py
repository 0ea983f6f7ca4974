"""The ViT classifier of fine-tuning and robustness (:class:`FinetuneViT`), and the copy of
pre-trained encoder weights into a new model (also the segmentation model's).

:class:`FinetuneViT`: the pre-trained ViT with stochastic depth (drop path rising linearly
over the blocks), then MAE's global-pool head: mean patch token -> ``fc_norm`` LayerNorm
-> ``head`` linear (N(0, 2e-5), zero bias), the encoder's final ``norm`` dropped; with
``pool="cls"`` the final ``norm`` is kept and the cls token classified.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax.models import variants, vit


class FinetuneViT(vit.EncoderArchitecture, kw_only=True):
  """Pre-trained encoder + classification head (``pool``: ``"mean"`` or ``"cls"``)."""

  num_classes: int
  drop_path_rate: float = 0.1
  pool: str = "mean"
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None
  learned_pos_embed: bool = True  # finetune.learn_pos_embed

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"unknown fine-tuning pool {self.pool!r}; expected 'mean' or 'cls'")
    # MAE's global pool normalises the pooled token (fc_norm), not the tokens.
    x = vit.Encoder(**variants.EncoderConfig.of(self).kwargs(),
                    drop_path_rate=self.drop_path_rate, final_norm=self.pool == "cls",
                    dtype=self.dtype, remat=self.remat, attention_impl=self.attention_impl,
                    learned_pos_embed=self.learned_pos_embed,
                    name="encoder")(images, deterministic=not train)
    if self.pool == "mean":
      x = jnp.mean(x[:, 1:], axis=1)
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(x)
    else:
      x = x[:, 0]
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.truncated_normal(2e-5), name="head")(x)
    return logits.astype(jnp.float32)


def build_model(encoder: variants.EncoderConfig, *, num_classes: int, image_size: int,
                drop_path_rate: float, pool: str = "mean", dtype: Any = jnp.float32,
                remat: bool = False, attention_impl: Optional[str] = None,
                learned_pos_embed: bool = True) -> FinetuneViT:
  """The fine-tuning model around a pre-trained encoder's architecture. ``image_size`` may
  differ from pre-training: the sin-cos positions are computed for the new grid (the reference
  interpolates the pre-training table bicubically instead). With ``learned_pos_embed`` (the
  reference's fine-tuning) they start there and are trained."""
  if image_size % encoder.patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size "
                     f"{encoder.patch_size}")
  return FinetuneViT(
      num_classes=num_classes, **encoder.kwargs(image_size=image_size),
      drop_path_rate=drop_path_rate, pool=pool, dtype=dtype, remat=remat,
      attention_impl=attention_impl, learned_pos_embed=learned_pos_embed)


def init_params(model: FinetuneViT, key: jax.Array, pretrained_params: Any,
                channels: int) -> Any:
  """Fresh head parameters with the pre-trained encoder's weights in ``params["encoder"]``
  (:func:`copy_pretrained_encoder`)."""

  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  # jit: fast when called eagerly, inlined when called under an outer jit.
  params = jax.jit(functools.partial(model.init, train=False))(key, images)["params"]
  return {**params, "encoder": copy_pretrained_encoder(params["encoder"], pretrained_params)}


def copy_pretrained_encoder(encoder_params: Any, pretrained_params: Any) -> Any:
  """``encoder_params`` (a freshly initialised encoder tree) with every tensor replaced by the
  pre-trained one, in the target's dtype. The pre-trained final ``norm`` is dropped when the
  target has none (MAE's global-pool head, segmentation's multi-level features); a learned
  ``pos_embed`` the pre-trained encoder lacks (its table was fixed) keeps its initial value,
  that same sin-cos table; any other missing, extra or mis-shaped tensor is an error."""
  target = traverse_util.flatten_dict(encoder_params)
  source = traverse_util.flatten_dict(jax.tree.map(np.asarray, pretrained_params))
  if ("pos_embed",) in target and ("pos_embed",) not in source:
    source[("pos_embed",)] = target[("pos_embed",)]
  if "norm" not in encoder_params:
    source = {k: v for k, v in source.items() if k[0] != "norm"}
  missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
  mismatched = [(k, target[k].shape, source[k].shape) for k in target
                if k in source and target[k].shape != source[k].shape]
  if missing or unexpected or mismatched:
    raise ValueError(f"pre-trained encoder does not fit the fine-tuning model: missing "
                     f"{missing}, unexpected {unexpected}, shape mismatches {mismatched}")
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(source[k], target[k].dtype) for k in target})
