"""The trainer end to end: outputs, exact resume after SIGKILL, NaN stop.

(More kill points, corrupt checkpoints: tests/test_faults.py.)

Runs use the demo preset (generated data through the real data_prep path,
tiny towers) with a handful of steps, plus one run on real fashion
TFRecords with the real pretrained MiniLM text tower.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
import demo_configs
from mic_jax import hostmem
from mic_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _demo_config(kind="cross_modal", **overrides):
  return demo_configs.short_demo(
      kind, **{"total_steps": 6, "log_every": 2, "eval_every": 3, **overrides})


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step)
  return step, restored["params"]


def test_demo_run_writes_every_output(tmp_path):
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(_demo_config(), workdir)
  run = pathlib.Path(workdir)
  saved = json.loads((run / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  for split in ("validation", "test"):
    assert 0.0 <= saved[split]["macro_f1"] <= 1.0
    assert 0.0 <= saved[split]["accuracy"] <= 1.0
    assert (run / f"per_class_{split}.csv").read_text().count("\n") == 9
    assert (run / f"confusion_{split}.png").stat().st_size > 1000
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  for l in train_lines:
    for key in ("train/learning_rate", "train/grad_norm",
                "train/examples_per_sec"):
      assert key in l and np.isfinite(l[key])
  assert json.loads((run / "config.json").read_text())["num_classes"] == 8
  # Calibration (issue 15): fitted on validation, reported on every split.
  calibration = json.loads((run / "calibration.json").read_text())
  assert set(calibration) == {"temperature", "fitted_on"}
  assert calibration["fitted_on"] == "validation"
  for split in ("validation", "test"):
    block = saved[split]["calibration"]
    assert set(block) == {"temperature", "nll_before", "nll_after",
                          "ece_before", "ece_after"}
    assert block["temperature"] == calibration["temperature"] > 0
    assert saved[split]["accuracy"] <= saved[split]["top5_accuracy"] <= 1
    assert set(saved[split]["macro_f1_by_frequency"]) == {"head", "middle",
                                                          "tail"}
    assert (run / f"reliability_{split}.png").stat().st_size > 1000
  assert (saved["validation"]["calibration"]["nll_after"]
          <= saved["validation"]["calibration"]["nll_before"] + 1e-9)
  assert list(run.glob("events.out.tfevents.*"))
  assert (run / "training_curves.png").exists()
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 6]

  # config.init_checkpoint: a new run starts from this run's best params,
  # named by its workdir, its best/ directory or one step directory.
  from mic_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  best = saved["best_step"]
  second = _demo_config(init_checkpoint=workdir)
  new_run = trainer.build_run(second, str(tmp_path / "second"))
  state, how = trainer.init_state(new_run, checkpointing.RunCheckpoints(
      str(tmp_path / "second"), keep=1, async_save=False))
  assert how == f"initialised from checkpoint {workdir}"
  _, want = checkpointing.RunCheckpoints(workdir, keep=1).restore_best(
      new_run.abstract_state.params)
  for source in (workdir, f"{workdir}/best", f"{workdir}/best/{best}"):
    got = checkpointing.restore_params_from(source,
                                            new_run.abstract_state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  last = checkpointing.restore_params_from(f"{workdir}/checkpoints/6",
                                           new_run.abstract_state.params)
  _, final = _final_params(workdir)
  for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint"):
    checkpointing.restore_params_from(str(tmp_path / "nothing"),
                                      new_run.abstract_state.params)


def test_kill_and_resume_is_bitwise_exact(tmp_path, seed_demo_workdir):
  """SIGKILL after a checkpoint, rerun: same final params as no interruption."""
  args = ["--config=configs/cross_modal.py:demo", "--config.total_steps=40",
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=1",
          "--config.eval_every_steps=1000", "--config.batch_size=8",
          "--config.keep_checkpoints=20"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "mic_jax.main"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  # Both runs start from copies of one demo preparation (the session's) so
  # only the interruption differs.
  for workdir in (straight, resumed):
    seed_demo_workdir(workdir)
  subprocess.run(cmd + args + [f"--workdir={straight}"], check=True, env=env,
                 cwd=REPO, timeout=600, capture_output=True)
  proc = subprocess.Popen(cmd + args + [f"--workdir={resumed}"], env=env,
                          cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (resumed / "checkpoints" / "8").exists():
    assert proc.poll() is None, "run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (resumed / "results.json").exists(), "kill came too late"
  logged = (resumed / "metrics.jsonl").read_text().splitlines()
  subprocess.run(cmd + args + [f"--workdir={resumed}"], check=True, env=env,
                 cwd=REPO, timeout=600, capture_output=True)
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == 40
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The killed run's lines up to its last checkpoint survive; the steps it
  # logged after that are logged once, by the resumed run.
  after = (resumed / "metrics.jsonl").read_text().splitlines()
  kept = [l for l in logged if json.loads(l)["step"] <= 8]
  assert after[:len(kept)] == kept and len(after) > len(kept)
  steps = [json.loads(l)["step"] for l in after if "train/loss" in l]
  assert steps == list(range(1, 41))


def test_nonfinite_update_is_never_saved(tmp_path):
  """A NaN learning rate: the loss of step 1 is still finite (computed
  before the update) but the updated params are not; nothing is saved."""
  workdir = tmp_path / "nan"
  config = _demo_config(**{"optim.lr": float("nan"), "total_steps": 4,
                           "checkpoint_every_steps": 1,
                           "log_every_steps": 100, "eval_every_steps": 100})
  with pytest.raises(trainer.TrainingError,
                     match=r"update of step 1 made the train state non-finite"
                     r" \(NaN/Inf at step 1 in params: \w+/") as e:
    trainer.train_and_evaluate(config, str(workdir))
  assert "opt_state" not in str(e.value)  # AdamW moments stay finite.
  assert not [p for p in (workdir / "checkpoints").iterdir()
              if p.name.isdigit()]
  assert sorted(p.name for p in (workdir / "best").iterdir()
                if p.name.isdigit()) == ["0"]  # Before the update: finite.


def test_rerun_after_kill_between_best_and_state_save_finishes(
    tmp_path, monkeypatch):
  """Defect: best/<s> durable, checkpoints/<s> not; the rerun reached s
  again and Orbax refused best/<s> (StepAlreadyExistsError), every time."""
  from mic_jax.train import faults  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = _demo_config(total_steps=4, eval_every_steps=2,
                        checkpoint_every_steps=3)
  # Evaluations at 0, 2, 4 and a state save at 3: kill after the best save of
  # step 2 (durable) before the state save of step 3 ...
  monkeypatch.setenv(faults.ENV, "before_state_save:1:raise")
  faults.reset()
  with pytest.raises(faults.InjectedFault):
    trainer.train_and_evaluate(config, workdir)
  assert (tmp_path / "run" / "best").exists()
  assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()
              if p.name.isdigit()]
  # ... and once more after the state save of step 3, before step 4's eval.
  monkeypatch.setenv(faults.ENV, "after_step:4:raise")
  faults.reset()
  with pytest.raises(faults.InjectedFault):
    trainer.train_and_evaluate(config, workdir)
  monkeypatch.delenv(faults.ENV)
  results = trainer.train_and_evaluate(config, workdir)
  assert results["best_step"] in (0, 2, 4)
  lines = [json.loads(l) for l in
           (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4]
  assert [l["step"] for l in lines if "validation/macro_f1" in l] == [0, 2, 4]


def test_nan_update_stops_with_clear_message(tmp_path, caplog, monkeypatch):
  """A NaN learning rate: every loss is finite, the update is not."""
  # This process never chose a host allocator: the trainer says so.
  monkeypatch.setattr(hostmem, "_configured", None)
  config = _demo_config(**{"optim.lr": float("nan"), "total_steps": 4})
  with pytest.raises(trainer.TrainingError,
                     match="update of step 1 made the train state non-finite "
                     r"\(NaN/Inf at step 2 in params"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))
  assert "hostmem.configure('auto') before importing JAX" in caplog.text


def test_nan_loss_stops_with_clear_message(tmp_path):
  """A loss that blows up is named as the loss, at its step, not as the
  non-finite update it also causes. A learning rate of 1e30 keeps step 1's
  update finite (AdamW's step is about lr) but step 2's loss is not."""
  config = _demo_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0,
                           "total_steps": 4})
  with pytest.raises(trainer.TrainingError,
                     match=r"^loss is (nan|inf) at step 2: training stopped"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))
  assert not (tmp_path / "nan" / "checkpoints" / "2").exists()


def test_a_run_reads_its_data_set_info_once_and_resolves_its_config_once(
    tmp_path, monkeypatch):
  """``dataset_info.json`` is read once per run and handed on (train
  stream, every evaluation, the final report), and ``resolve_auto`` runs
  once (issue 34)."""
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  calls = {"read_info": 0, "resolve_auto": 0}

  def counted(name, function):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return function(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(records, "read_info",
                      counted("read_info", records.read_info))
  monkeypatch.setattr(common, "resolve_auto",
                      counted("resolve_auto", common.resolve_auto))
  config = _demo_config(total_steps=2, eval_every=2)
  trainer.train_and_evaluate(config, str(tmp_path / "once"))
  assert calls == {"read_info": 1, "resolve_auto": 1}, calls


def test_check_finite_names_the_first_bad_step_and_kind():
  """Each branch of the check, and the order (the earliest step wins)."""
  ok = (1, np.float32(0.5), np.True_)
  trainer._check_finite(3, [ok, ok], None)  # pylint: disable=protected-access
  with pytest.raises(trainer.TrainingError, match="^loss is inf at step 2"):
    trainer._check_finite(  # pylint: disable=protected-access
        3, [ok, (2, np.float32("inf"), np.False_), (3, 1.0, np.False_)], None)
  with pytest.raises(trainer.TrainingError, match="update of step 2 made"):
    trainer._check_finite(  # pylint: disable=protected-access
        3, [ok, (2, np.float32(0.1), np.False_)],
        types.SimpleNamespace(params={"w": np.array([np.nan])}, opt_state={}))


@pytest.mark.realdata
def test_two_steps_on_real_fashion_tfrecords(tmp_path, fashion_dir, minilm_dir):
  """Real catalogue rows -> data_prep -> 2 train steps with MiniLM -> eval."""
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  import csv  # pylint: disable=g-import-not-at-top
  rows = list(csv.DictReader(open(fashion_dir / "styles.csv",
                                  encoding="utf-8")))
  keep = [r for r in rows if r["masterCategory"] in ("Footwear",
                                                     "Accessories")][:300]
  catalogue = tmp_path / "catalogue.csv"
  with open(catalogue, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(keep[0]))
    writer.writeheader()
    writer.writerows(keep)
  out = tmp_path / "prepared"
  prepare.main([
      f"--input={catalogue}", "--id_column=id",
      "--title_column=productDisplayName", "--label_column=masterCategory",
      f"--image_pattern={fashion_dir}/images/{{id}}.jpg",
      f"--tokenizer={minilm_dir}", "--max_length=32", f"--output_dir={out}",
      "--num_workers=1"])
  config = common.make_config("cross_modal", "small")
  with config.unlocked():
    config.data.dir = str(out)
    config.text.checkpoint = str(minilm_dir)
    config.total_steps = 2
    config.batch_size = 8
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.image.size = 32
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["test"]["num_examples"] > 0
  assert 0 <= results["test"]["macro_f1"] <= 1


def test_optimizer_moments_shard_like_their_params(tmp_path):
  """With lr groups (MaskedNode holes) and FSDP, mu/nu follow their params."""
  config = _demo_config(**{"optim.lr_multipliers": "txt=0.5",
                           "mesh.data": 2, "mesh.fsdp": 4})
  run = trainer.build_run(config, str(tmp_path))
  params = {tuple(k.key for k in path): s for path, s in
            jax.tree_util.tree_flatten_with_path(
                run.state_shardings.params)[0]}
  assert any(s.spec != jax.sharding.PartitionSpec() for s in params.values())
  moments = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(
      run.state_shardings.opt_state)[0]:
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    for kind in ("mu", "nu"):
      if kind in names:
        key = tuple(names[names.index(kind) + 1:])
        moments[(kind, key)] = sharding
  assert len(moments) == 2 * len(params)
  for (kind, key), sharding in moments.items():
    assert sharding == params[key], (kind, key)


def test_gradient_accumulation_equals_one_big_batch():
  """Without dropout, k micro-batches give the same updates as one batch.

  Three steps at a non-zero learning rate (no warmup), so the parameters
  really move and a wrong accumulation (say, normalising per micro-batch)
  shows in them, not only in the loss.
  """
  from mic_jax.train import optimizer, steps, towers  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  config = _demo_config(**{"text.dropout": 0.0, "fusion.dropout": 0.0,
                           "num_classes": 8, "optim.warmup_steps": 0,
                           # Noise-only gradients (key biases) must not get
                           # lr-sized Adam steps: see tests/test_sharding.py.
                           "optim.eps": 1e-3})
  model = towers.build_model(config)
  rng = np.random.default_rng(0)
  b, length, size = 8, config.text.max_length, config.image.size
  batch = {
      "input_ids": rng.integers(5, 40, (b, length)).astype(np.int32),
      "attention_mask": (np.arange(length)[None] < rng.integers(
          3, length, (b, 1))).astype(np.int32),
      "token_type_ids": np.zeros((b, length), np.int32),
      "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
      "image_present": np.array([1, 0, 1, 1, 1, 1, 0, 1], np.int32),
      "label": rng.integers(0, 8, (b,)).astype(np.int32),
      "mask": np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32),
  }
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  tx, schedule = optimizer.make_optimizer(config.optim, params, 10)
  start = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  out = {}
  for k in (1, 4):
    step = jax.jit(steps.make_train_step(
        model, tx, schedule, seed=0, grad_accum_steps=k, label_smoothing=0.1,
        loss_class_weights=np.ones(8, np.float32)))
    state, history = start, []
    for _ in range(3):
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
    out[k] = state, history
  for metrics in out[1][1]:
    assert metrics["train/learning_rate"] > 0
  moved = max(float(np.abs(np.asarray(a) - np.asarray(c)).max())
              for a, c in zip(jax.tree.leaves(out[1][0].params),
                              jax.tree.leaves(params)))
  assert moved > 1e-4, moved  # The comparison below is not vacuous.
  for got, want in zip(out[4][1], out[1][1]):
    np.testing.assert_allclose(got["train/loss"], want["train/loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(got["train/grad_norm"], want["train/grad_norm"],
                               rtol=1e-5)
  for a, c in zip(jax.tree.leaves(out[4][0].params),
                  jax.tree.leaves(out[1][0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)


def test_focal_loss_reaches_the_train_step(tmp_path):
  """config.loss.{kind, focal_gamma}, smoothing and class weights: the
  step's loss is the focal formula on the model's logits."""
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mic_jax.train import checkpointing, steps  # pylint: disable=g-import-not-at-top
  config = _demo_config(**{"loss.kind": "focal", "loss.focal_gamma": 1.5,
                           "loss.label_smoothing": 0.1,
                           "loss.class_weighting": "inverse",
                           "text.dropout": 0.0, "fusion.dropout": 0.0})
  run = trainer.build_run(config, str(tmp_path))
  state, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      str(tmp_path), keep=1, async_save=False))
  batch = next(pipeline.train_batches(
      run.data_dir, batch_size=config.batch_size,
      image_size=config.image.size, seed=0, start_step=0,
      shuffle_buffer=config.data.shuffle_buffer))
  logits, _ = run.model.apply({"params": state.params}, batch, train=False)
  logits = np.asarray(logits, np.float64)
  weights = steps.class_weights(run.info.class_counts("train"), "inverse")
  w = batch["mask"] * weights[batch["label"]]
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  q = np.eye(8)[batch["label"]] * 0.9 + 0.1 / 8
  focal = -(q * (1 - np.exp(logp)) ** 1.5 * logp).sum(-1)
  with jax.set_mesh(run.mesh):
    _, metrics = trainer.jit_train_step(run, donate=False)(state, batch)
  np.testing.assert_allclose(float(metrics["train/loss"]),
                             (focal * w).sum() / w.sum(), rtol=1e-5)


def test_metrics_log_on_an_object_store(tmp_path, monkeypatch):
  """metrics.jsonl in a scheme:// workdir (TF's in-memory ram:// here, as
  gs:// in production) goes through tf.io.gfile, not a local open()."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mic_jax.evaluation import reporting  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  workdir = f"ram://{tmp_path.name}/run"
  tf.io.gfile.makedirs(workdir)
  log = reporting.MetricsLog(workdir)
  log.append({"step": 1, "train/loss": 2.0})
  log.append({"step": 2, "train/loss": 1.5})
  log.close()
  assert [r["step"] for r in reporting.read_metrics(workdir)] == [1, 2]
  assert list(tmp_path.iterdir()) == []  # No local "ram:" folder.
  again = reporting.MetricsLog(workdir, keep_through_step=1)  # A resume.
  again.close()
  assert [r["step"] for r in reporting.read_metrics(workdir)] == [1]
  tf.io.gfile.rmtree(f"ram://{tmp_path.name}")


def test_a_relative_workdir_saves_its_checkpoints(tmp_path, monkeypatch):
  """``--workdir=runs/x``: Orbax refuses a relative path, and only in the
  background thread of an async save, which a real run met at step 200
  when the step-0 best save's failure surfaced."""
  from mic_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  params = {"w": jnp.arange(3.0)}
  ckpt = checkpointing.RunCheckpoints("runs/x", keep=1, async_save=True)
  ckpt.save_best(0, params, {checkpointing.BEST_METRIC: 0.5})
  ckpt.save_state(1, {"params": params}, force=True)
  ckpt.close()
  ckpt = checkpointing.RunCheckpoints("runs/x", keep=1, async_save=False)
  step, best = ckpt.restore_best(jax.eval_shape(lambda: params))
  ckpt.close()
  assert step == 0
  np.testing.assert_array_equal(best["w"], params["w"])
