"""Opening a tfds data set for either input path, without ever downloading it.

``tfds.data_source`` and ``tfds.load`` download a missing data set unless told
``download=False`` (CIFAR-10 offline: minutes of retries, then ``*.tmp.*`` files left
behind). ``tfds.builder`` only reads, and a data set that is not prepared stops here with
one line on how to prepare it. No TensorFlow (tfds imports it lazily): the device path
uses this too.
"""

from __future__ import annotations

import difflib

import tensorflow_datasets as tfds

from lut_jax import errors


def prepared_builder(name: str, data_dir: str | None, *, random_access: bool = False):
  """The builder of tfds data set ``name`` (``"cifar10"``, ``"imagenet2012:5.1.0"``),
  prepared under ``data_dir`` (tfds's default when None). A DataError when tfds knows no
  such name (naming close ones), config or version; a DataNotFoundError saying how to
  prepare it when it is not prepared (in array_record for ``random_access``, the device
  path's ``as_data_source``).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds's own message lists every data set it knows (hundreds of lines).
    raise errors.DataError(_unknown_message(name)) from None
  except (ValueError, AssertionError) as e:  # an unknown config or version
    raise errors.DataError(f"cannot open tfds {name!r}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise errors.DataNotFoundError(_not_prepared_message(name, builder, random_access))
  return builder


def _unknown_message(name: str) -> str:
  base = name.split("/")[0].split(":")[0]
  close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False))
  maybe = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
  return (f"unknown dataset {name!r}: tfds has no data set of that name{maybe}; "
          "input.dataset must be a tfds image dataset name (e.g. 'imagenet2012', "
          "'fashion_mnist', 'cifar10'; see `tfds.list_builders()`) or "
          "'folder:/path/to/images' (one sub-folder per class)")


def _not_prepared_message(name: str, builder, random_access: bool) -> str:
  # tf.data reads tfds's default format (tfrecord) only, tfds.data_source array_record only.
  build = (f"`tfds build {name} --data_dir=<data_dir>"
           + (" --file_format=array_record`" if random_access else "`"))
  if name.startswith("imagenet2012"):
    return (
        f"ImageNet ({name}) is not prepared under {builder.data_dir}. It needs tfds's "
        "manual download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
        f"image-net.org, put them in <data_dir>/downloads/manual/, then run {build} (or "
        "pass input.data_dir). Alternatively point input.dataset at an image folder: "
        "'folder:/path/to/train_dir'.")
  load = "data_source" if random_access else "load"
  return (f"tfds dataset {name!r} is not prepared under {builder.data_dir}, and lut_jax "
          f"never downloads: prepare it on a machine with internet access with {build} (or "
          f"`tfds.{load}({name!r}, data_dir=<data_dir>)`) and set input.data_dir to "
          "<data_dir>.")
