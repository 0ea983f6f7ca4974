"""Listing image folders (``<folder>/<class>/**/<image>``) safely, without TensorFlow.

Symbolic links never make an example appear twice or under another class's label:

* a directory link is followed when it brings in files from outside the data folder (class
  folders linked in from elsewhere are a common layout), and skipped, with a warning, when
  it points back into the data folder, contains it, loops (points to a folder it is in), or
  leads to a folder already listed through another link;
* a file is read once however many links lead to it: the entry that is not a link wins
  (it keeps its own folder's label), else the first in listing order; the others are
  skipped and counted as listed twice.

Both input paths list folders here: the tf.data path (:mod:`lut_jax.data.datasets`) and the
on-device path (:mod:`lut_jax.data.device_input`).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from lut_jax import errors

FOLDER_PREFIX = "folder:"  # config.input.dataset = "folder:/path/to/class_folders"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def plural(n: int, singular: str, plural: str) -> str:
  return f"{n} {singular if n == 1 else plural}"


@dataclasses.dataclass
class Listing:
  """The image files of a folder in reading order, and what was left out of it."""

  classes: list[str]  # class folder names; a file's label is its class's index here
  files: list[str] = dataclasses.field(default_factory=list)  # as listed, under their class
  labels: list[int] = dataclasses.field(default_factory=list)
  # Files left out because another entry already lists the same file.
  duplicates: list[str] = dataclasses.field(default_factory=list)
  # "link -> target (why)" of the directory links not followed; "folder (why)" of the
  # folders that could not be listed.
  links: list[str] = dataclasses.field(default_factory=list)
  unreadable: list[str] = dataclasses.field(default_factory=list)

  def warn(self, name: str) -> None:
    """One warning line per kind of entry left out: how many, and examples."""
    if self.links:
      logging.warning(
          "%s: skipped %s, so that no file is read twice or under another class's label, "
          "e.g. %s", name, plural(len(self.links), "directory link", "directory links"),
          self.links[:3])
    if self.duplicates:
      logging.warning(
          "%s: skipped %s (symbolic links to a file listed elsewhere); each file is read "
          "once, under its own folder's label, e.g. %s", name,
          plural(len(self.duplicates), "file listed twice", "files listed twice"),
          self.duplicates[:3])
    if self.unreadable:
      logging.warning("%s: skipped %s, e.g. %s", name,
                      plural(len(self.unreadable), "folder that cannot be listed",
                              "folders that cannot be listed"), self.unreadable[:3])


def _inside(path: str, folder: str) -> bool:
  """Whether real path ``path`` is ``folder`` or lies below it."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_problem(target: str, parent: str, root: str, visited: set[str]) -> str:
  """Why the directory link in real folder ``parent`` to real path ``target`` must not be
  followed ("" when it may): see the module docstring for the policy."""
  if _inside(target, root):
    return "points into the data folder"
  if _inside(parent, target):
    return "a loop: points to a folder it is in"
  if _inside(root, target):
    return "contains the data folder"
  if target in visited:
    return "already listed"
  return ""


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # a link that loops on itself (a -> b -> a): no folder to walk
    return False


def _scan(path: str) -> list[os.DirEntry]:
  with os.scandir(path) as entries:
    return sorted(entries, key=lambda e: e.name)


def _class_folders(root: str, real_root: str, visited: set[str],
                   listing: Listing) -> list[tuple[str, str]]:
  """``(path, real path)`` of ``root``'s class folders in label order; records their names
  in ``listing.classes``, the links not followed in ``listing.links``, and claims them in
  ``visited``."""
  tops = []
  try:
    top_entries = _scan(root)
  except OSError as e:
    raise errors.DataError(errors.describe_os_error(e, "listing the image folder")) from e
  for entry in top_entries:
    if not _is_dir(entry):  # follows a link: a link to a folder is a class folder
      continue
    if entry.is_symlink():
      target = os.path.realpath(entry.path)
      problem = _link_problem(target, real_root, real_root, visited)
      if problem:
        listing.links.append(f"{entry.path} -> {target} ({problem})")
        continue
    else:
      target = os.path.join(real_root, entry.name)
    visited.add(target)
    listing.classes.append(entry.name)
    tops.append((entry.path, target))
  return tops


def local_class_names(root: str) -> list[str]:
  """The class folders of ``root`` in label order, as :func:`list_local_folder` finds them,
  without listing their files."""
  listing = Listing([])
  _class_folders(root, os.path.realpath(root), {os.path.realpath(root)}, listing)
  return listing.classes


def split_folder(name: str, root: str, split: str, *, isdir=os.path.isdir
                 ) -> tuple[str, str | None]:
  """``(folder, train_folder)`` of split ``split`` (``"val"``, ``"train[:90%]"``) of image
  folder ``root``: ``<root>/<split>/`` when it exists, with, for other splits than
  ``train``, ``<root>/train`` when that exists too, whose classes then define every split's
  labels (:func:`follow_classes`: ``val/c`` never takes ``train/b``'s label). Else the whole
  folder (a released evaluation set's layout; :func:`check_distinct_splits` checks that two
  splits are not the same images). ``isdir``: ``tf.io.gfile.isdir`` for object stores.
  """
  base = split.split("[")[0]
  if base and isdir(os.path.join(root, base)):
    train = os.path.join(root, "train")
    return os.path.join(root, base), (train if base != "train" and isdir(train) else None)
  if base not in ("", "train"):
    logging.info("%s: no sub-folder %r; the whole folder is split %r", name, base, split)
  return root, None


def check_distinct_splits(dataset: str, splits: dict[str, str]) -> None:
  """Raises ``DataError`` when two of ``splits`` (``{field: split}``: a monitor's bank and
  queries, a probe's train and eval splits) of image folder ``dataset`` are differently
  named splits that both read the whole folder (neither has its own sub-folder), so one
  would score the other's images. Slices of one split name (``train[:90%]`` and
  ``train[90%:]``) are the user's own hold-out and pass, as do other data sets."""
  if not dataset.startswith(FOLDER_PREFIX):
    return
  root = dataset[len(FOLDER_PREFIX):]
  if not os.path.isdir(root):
    return  # reported where the data is read
  first: dict[str, tuple[str, str]] = {}  # folder -> (field, split) of the first to read it
  for field, split in splits.items():
    folder, _ = split_folder(dataset, root, split)
    other = first.setdefault(folder, (field, split))
    if other[1].split("[")[0] != split.split("[")[0]:
      raise errors.DataError(
          f"{other[0]}={other[1]!r} and {field}={split!r} of {dataset} are the same images: "
          "there is no sub-folder for each, so both read the whole folder",
          hint=f"add {os.path.join(root, '<split>', '<class>', '<image>')} folders, or hold "
               "images out by slicing one split, e.g. train[:90%] and train[90%:]")


def follow_classes(listing: Listing, classes: list[str], name: str, split: str) -> None:
  """Relabels ``listing`` (in place) by the class names ``classes`` (the train split's):
  a class folder the train split does not have is an error, one it lacks is allowed."""
  unknown = [c for c in listing.classes if c not in classes]
  if unknown:
    raise errors.DataError(
        f"{name!r}: split {split!r} has class folders the train split does not have: "
        f"{unknown[:5]}", hint="labels follow the train split's class folders; rename or "
                               "remove these, or add them to the train split")
  index = {c: i for i, c in enumerate(classes)}
  listing.labels = [index[listing.classes[label]] for label in listing.labels]
  listing.classes = list(classes)


def list_local_folder(root: str) -> Listing:
  """Lists a local folder without following a link twice or into a loop (see the module
  docstring); the reading order and labels of a folder without links are those of
  ``lut_jax.data.datasets``' listing through ``tf.io.gfile`` (sorted class folders, then
  folders by path and files by name)."""
  real_root = os.path.realpath(root)
  # Real paths of the folders listed (or about to be): each is walked once at most. The
  # class folders are claimed first, so that a deeper link cannot take a class's files.
  visited = {real_root}
  listing = Listing([])
  tops = _class_folders(root, real_root, visited, listing)

  # (path as listed, label, real path, is a link) of every image file, in reading order.
  found: list[tuple[str, int, str, bool]] = []
  for label, (top, real_top) in enumerate(tops):
    folders = []  # (path, [(name, real path, is a link)]) of each folder of this class
    stack = [(top, real_top)]
    while stack:
      path, real = stack.pop()
      try:
        entries = _scan(path)
      except OSError as e:
        listing.unreadable.append(f"{path} ({e.strerror or e})")
        continue
      images = []
      for entry in entries:
        is_link = entry.is_symlink()
        if _is_dir(entry):
          if is_link:
            target = os.path.realpath(entry.path)
            problem = _link_problem(target, real, real_root, visited)
          else:
            target = os.path.join(real, entry.name)
            problem = "already listed" if target in visited else ""
          if problem:
            listing.links.append(f"{entry.path} -> {target} ({problem})")
          else:
            visited.add(target)
            stack.append((entry.path, target))
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
          real_file = (os.path.realpath(entry.path) if is_link
                       else os.path.join(real, entry.name))
          images.append((entry.name, real_file, is_link))
      folders.append((path, images))
    # Folder by folder in path order, as sorted(tf.io.gfile.walk(...)) lists them.
    for path, images in sorted(folders, key=lambda f: f[0]):
      found.extend((os.path.join(path, n), label, r, l) for n, r, l in images)

  # Each real file once: an entry that is not a link beats links to the same file (it keeps
  # its own folder's label); among links the first listed wins.
  owner: dict[str, int] = {}
  for i, (_, _, real, is_link) in enumerate(found):
    j = owner.get(real)
    if j is None or (found[j][3] and not is_link):
      owner[real] = i
  for i, (path, label, real, _) in enumerate(found):
    if owner[real] == i:
      listing.files.append(path)
      listing.labels.append(label)
    else:
      listing.duplicates.append(f"{path} (also {found[owner[real]][0]})")
  return listing
