"""Evaluation, export and the work-directory lock with their directories on an object store.

The store is a ``gs://`` stand-in without a network: epath's ``gs://`` paths are served by
fsspec over a local folder (the bucket), and TensorStore, which writes Orbax's arrays, is
pointed at the same folder. Orbax therefore takes its GCS code paths (a
``commit_success.txt`` per step instead of a rename), and a run reaches its files through
their ``gs://`` URLs only. A local file call on such a path (``os.makedirs``, ``open``)
creates a folder named ``gs:`` in the current directory instead: the tests run in an empty
one and check that it stays empty. TensorBoard event files are the one thing left out:
TensorFlow writes ``gs://`` with its own GCS client, so the tests record where the writers
were pointed.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import time
import types

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import segmentation as seg_config
from lut_jax import errors
from lut_jax.evaluation import features, finetune
from lut_jax.models import variants, vit
from lut_jax.runtime import checkpointing, workdir_lock
from lut_jax.weights import export, loading, sources
from tests import test_eval_cache, test_export, util
from tests.test_eval_cache import reads  # noqa: F401  (a fixture: the synthetic eval split)

BUCKET = "lut-jax-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_assert_bit_exact = test_export._assert_bit_exact  # pylint: disable=protected-access


@dataclasses.dataclass
class Store:
  url: str  # gs://BUCKET
  bucket: pathlib.Path  # the local folder that holds the bucket's objects
  cwd: pathlib.Path  # the tests' current directory, which must stay empty
  logdirs: list  # where the TensorBoard writers were pointed
  pretrain: str = ""  # a pre-training work directory in the store
  state: object = None  # its train state

  def read_json(self, url: str) -> dict:
    assert url.startswith(self.url + "/")
    return json.loads((self.bucket / url[len(self.url) + 1:]).read_text())

  def assert_nothing_local(self) -> None:
    assert os.listdir(self.cwd) == []
    assert not os.path.exists(os.path.join(REPO, "gs:"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A :class:`Store` holding a pre-training work directory, for this module's tests."""
  pytest.importorskip("fsspec")
  from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top
  from fsspec.implementations import dirfs, local  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  class Bucket(dirfs.DirFileSystem):
    protocol = "gs"  # strips "gs://", so that "gs://b/x" is ROOT/b/x and lists as "b/x"

  root = tmp_path_factory.mktemp("store")
  fs = Bucket(path=str(root), fs=local.LocalFileSystem())

  def kvstore(url: str) -> dict:  # TensorStore's spec of a gs:// path, as a local folder
    bucket, path = gcs_utils.parse_gcs_path(url, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / path)}

  logdirs = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(backend.fsspec_backend, "fs", lambda path: fs)
    # With TensorFlow installed epath would serve gs:// with tf.io.gfile instead.
    patch.setattr(gpath, "_is_tf_installed", lambda: False)
    patch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    patch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    if importlib.util.find_spec("tensorflow") is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      def create_file_writer(logdir, **kwargs):
        del kwargs
        logdirs.append(os.fspath(logdir))
        return tf.summary.create_noop_writer()

      patch.setattr(tf.summary, "create_file_writer", create_file_writer)
    cwd = tmp_path_factory.mktemp("cwd")
    patch.chdir(cwd)
    s = Store(url=f"gs://{BUCKET}", bucket=root / BUCKET, cwd=cwd, logdirs=logdirs)
    s.pretrain = f"{s.url}/pretrain"
    s.state = test_export.make_pretraining_workdir(s.pretrain)
    assert (s.bucket / "pretrain" / "checkpoints" / str(test_export.STEP) /
            "commit_success.txt").is_file()  # Orbax's GCS commit, in the bucket
    s.assert_nothing_local()
    yield s


def _images(n: int, seed: int, size: int, channels: int) -> dict:
  """Three classes told apart by the image's brightness."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  images = (labels[:, None, None, None] - 1.0) + 0.1 * rng.normal(size=(n, size, size,
                                                                          channels))
  return {"image": images.astype(np.float32), "label": labels}


def _config(mode: str, store: Store, monkeypatch):
  """A tiny config of ``mode`` on the store's pre-training run."""
  if mode == "knn":
    config = test_eval_cache.knn_config_for_tests()
  elif mode == "linear_probe":
    config = test_eval_cache._tiny_probe_config()  # pylint: disable=protected-access
  elif mode == "finetune":
    config = finetune_config.get_config()
    config.num_classes = 3
    config.log_every_steps = 2
    ft = config.finetune
    ft.batch_size, ft.epochs, ft.warmup_epochs, ft.eval_every_epochs = 16, 2, 1, 1
    size, channels = util.IMAGE_SIZE, util.tiny_config().input.channels

    def train_data_fn(start_step):
      for step in range(start_step, 1 << 30):
        yield _images(16, 100 + step, size, channels)

    # 2 steps per epoch; the data of test_finetune's loop, not the tf.data pipeline.
    monkeypatch.setattr(finetune, "run", functools.partial(
        finetune.run, train_data_fn=train_data_fn, num_train_examples=32,
        eval_data=[dict(_images(16, 1, size, channels), mask=np.ones(16, bool))]))
  else:
    from tests import test_segmentation  # pylint: disable=g-import-not-at-top
    test_segmentation._fashion_mnist_or_skip()  # pylint: disable=protected-access
    config = seg_config.get_config()
    config.input.image_size = config.synthetic.image_size = 28  # one item; 7 x 7 patches
    config.synthetic.train_examples, config.synthetic.eval_examples = 8, 8
    config.input.eval_batch_size = 8
    seg = config.segmentation
    seg.batch_size, seg.total_steps, seg.warmup_steps, seg.eval_every_steps = 8, 2, 1, 2
    seg.channels, seg.aux_channels = 8, 8
  config.pretrained = store.pretrain
  return config


@pytest.mark.parametrize("mode", ["knn", "linear_probe", "finetune", "segmentation"])
def test_lut_eval_runs_and_resumes_in_a_store_workdir(store, reads, monkeypatch, mode):  # noqa: F811
  """Each mode of ``lut-eval`` with ``--workdir`` and ``--config.pretrained`` on the store:
  the results, the config, the checkpoints and the feature caches land in the bucket, a
  rerun reads them back (resumes, or reuses the cache), and nothing is written locally.
  Robustness is left out: it needs a fine-tuned classifier and the tfds shifted test sets
  (tests/test_robustness.py); its files are written as the others' are."""
  pytest.importorskip("tensorflow")  # lut-eval's input pipelines and writers
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  config = _config(mode, store, monkeypatch)
  workdir = f"{store.url}/{mode}"
  results = evaluate_cli.evaluate(config, workdir)
  saved = store.read_json(f"{workdir}/{mode}_results.json")
  assert saved.pop("source")["pretrained"] == store.pretrain
  assert saved == results
  assert store.read_json(f"{workdir}/config.json")["mode"] == mode
  assert workdir in store.logdirs
  assert not (store.bucket / mode / workdir_lock.LOCK_FILE).exists()  # released
  files = {p.relative_to(store.bucket / mode).as_posix()
           for p in (store.bucket / mode).rglob("*") if p.is_file()}
  if mode in ("knn", "linear_probe"):
    assert {"features/train.npz", "features/test.npz"} <= files
  if mode != "knn":
    steps = checkpointing.finished_steps(checkpointing.absolute(f"{workdir}/checkpoints"))
    assert steps and all(f"checkpoints/{s}/commit_success.txt" in files for s in steps)
  # The rerun restores the finished state (or reads the cached features): the same scores.
  # (Segmentation resumes through fine-tuning's supervised.train: a rerun would only
  # double this test's time.)
  if mode != "segmentation":
    reads.clear()
    assert evaluate_cli.evaluate(config, workdir) == results
    if mode in ("knn", "linear_probe"):
      assert reads == []  # both splits from the cache in the store
  store.assert_nothing_local()


def test_timm_folder_round_trips_through_a_non_local_file_system(tmp_path, store):
  config = {"image_size": util.IMAGE_SIZE, "patch_size": 4, "width": 32, "depth": 2,
            "num_heads": 2, "mlp_ratio": 4.0}
  encoder = vit.Encoder(**config)
  params = jax.device_get(jax.jit(encoder.init)(
      jax.random.key(1), np.zeros((1, util.IMAGE_SIZE, util.IMAGE_SIZE, 3)))["params"])
  remote = f"{store.url}/timm"
  export.check_output_dir(remote)  # an object store has nothing to refuse up front
  export.write_timm_folder(remote, params, variants.EncoderConfig(**config))
  assert not os.path.exists(remote) and not os.path.exists(os.path.join(REPO, "gs:"))
  assert sources.locate(remote) == ("timm", remote, None)
  loaded = loading.load(remote, encoder_only=True)
  assert loaded.kind == "timm" and loaded.path == remote and loaded.config == config
  _assert_bit_exact(params, loaded.params)
  # Converted from there into a local export (Orbax copy + timm folder).
  written = export.export(remote, str(tmp_path / "local"))
  reloaded = loading.load(written["encoder"]).params
  _assert_bit_exact(params, reloaded)
  with pytest.raises(FileNotFoundError, match="no such file"):
    loading.load(f"{store.url}/missing", encoder_only=True)


def test_evaluation_files_round_trip_through_a_non_local_file_system(store):
  """Results, feature caches and resume records are written with epath, so an evaluation
  work directory can live on an object store (gs://) as a pre-training one can."""
  from lut_jax.evaluation import eval_config  # pylint: disable=g-import-not-at-top
  workdir = f"{store.url}/evaluation_files"
  path = eval_config.write_results(workdir, "knn", {"top1": 71.5}, source={"step": 3})
  assert path == f"{workdir}/knn_results.json" and not os.path.exists(path)
  assert json.loads(checkpointing.absolute(path).read_text()) == {"top1": 71.5,
                                                                  "source": {"step": 3}}
  calls = []

  def compute():
    calls.append(1)
    return {"cls": np.arange(6, dtype=np.float32).reshape(2, 3), "label": np.array([1, 0])}

  cache = f"{workdir}/features/train.npz"
  first = features.cached_features(cache, {"split": "train"}, compute)
  again = features.cached_features(cache, {"split": "train"}, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(first["cls"], again["cls"])
  features.cached_features(cache, {"split": "test"}, compute)  # another key: recomputed
  assert len(calls) == 2
  checkpoints = f"{workdir}/checkpoints"
  features.check_resume_key(checkpoints, "linear_probe", {"split": "train"})
  checkpointing.absolute(f"{checkpoints}/10").mkdir()
  features.check_resume_key(checkpoints, "linear_probe", {"split": "train"})  # same: resumes
  with pytest.raises(errors.WorkdirError, match="a different split"):
    features.check_resume_key(checkpoints, "linear_probe", {"split": "test"})


def test_lut_export_round_trips_through_the_store(store):
  """``lut-export`` of a run on the store, into its default ``WORKDIR/encoder`` there: the
  Orbax copy and the timm file both reload the online encoder bit-exactly."""
  written = export.export(store.pretrain)
  assert written == {"encoder": f"{store.pretrain}/encoder",
                     "timm": f"{store.pretrain}/encoder/model.safetensors"}
  online = jax.device_get(store.state.params["encoder"])
  _assert_bit_exact(online, loading.load(written["encoder"], encoder_only=True).params)
  _assert_bit_exact(online, loading.load(written["timm"], encoder_only=True).params)
  assert (store.bucket / "pretrain" / "encoder" / "model.safetensors").is_file()
  store.assert_nothing_local()


def test_the_store_lock_says_what_it_cannot_guarantee_and_refuses_a_second_run(store,
                                                                                caplog):
  workdir = f"{store.url}/locked"
  lock_file = store.bucket / "locked" / workdir_lock.LOCK_FILE
  with workdir_lock.WorkdirLock(workdir, "first run", kind=workdir_lock.EVALUATION):
    said = [r.getMessage() for r in caplog.records if "exclusive create" in r.getMessage()]
    assert said == [f"Lock on {workdir}/{workdir_lock.LOCK_FILE}: object stores offer no "
                    "exclusive create; a run started while this one runs is refused, two "
                    "started at the same moment are not detected."]
    assert json.loads(lock_file.read_text())["command"] == "first run"
    with pytest.raises(errors.WorkdirError, match="in use by another run.*first run"):
      workdir_lock.WorkdirLock(workdir, "second run").acquire()
  assert not lock_file.exists()
  # An evaluation lock in a pre-training run's directory is refused before any write.
  with pytest.raises(errors.WorkdirError, match="holds a run of another kind"):
    workdir_lock.WorkdirLock(store.pretrain, kind=workdir_lock.EVALUATION).acquire()
  store.assert_nothing_local()


def test_the_store_lock_gives_way_to_a_lock_written_over_its_own(store, monkeypatch):
  """Two runs that both found no lock both write one; the store keeps the last write, and
  the run that reads back the other's lock stops."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  workdir = f"{store.url}/raced"
  rival = {"host": "other-host", "pid": 1, "command": "rival run", "started": "now"}
  write_text = gpath.PosixGPath.write_text

  def write_then_rival(path, text, *args, **kwargs):
    out = write_text(path, text, *args, **kwargs)
    if path.name == workdir_lock.LOCK_FILE:
      write_text(path, json.dumps(rival))
    return out

  monkeypatch.setattr(gpath.PosixGPath, "write_text", write_then_rival)
  lock = workdir_lock.WorkdirLock(workdir, "this run")
  with pytest.raises(errors.WorkdirError, match="pid 1 on other-host.*rival run"):
    lock.acquire()
  lock.release()  # never held: the rival's lock stays
  assert json.loads((store.bucket / "raced" / workdir_lock.LOCK_FILE).read_text()) == rival


def test_an_unreadable_store_lock_is_a_writer_until_it_is_old(store):
  """A lock file that cannot be parsed is a run caught between create and write while it
  is young (its age read from the store), and debris of a crash once it is old."""
  workdir = f"{store.url}/unreadable"
  lock_file = store.bucket / "unreadable" / workdir_lock.LOCK_FILE
  lock_file.parent.mkdir(parents=True)
  lock_file.write_text("{half a lock")
  with pytest.raises(errors.WorkdirError, match="an unreadable lock file"):
    workdir_lock.WorkdirLock(workdir).acquire()
  old = time.time() - 60
  os.utime(lock_file, (old, old))
  with workdir_lock.WorkdirLock(workdir, "taker"):
    assert json.loads(lock_file.read_text())["command"] == "taker"
  store.assert_nothing_local()


def test_lut_analyze_refuses_an_output_directory_on_a_store(store):
  """Its figures are written by matplotlib to local files: refused before any analysis."""
  from lut_jax.cli import analyze  # pylint: disable=g-import-not-at-top
  args = types.SimpleNamespace(mask_ratio=None, images="fashion_mnist", labels=[],
                               checkpoint=[store.pretrain], probe=[],
                               out=f"{store.url}/figures")
  with pytest.raises(errors.UserError, match="writes its figures to a local directory"):
    analyze.analyze(args)
  store.assert_nothing_local()
