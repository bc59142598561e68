"""Recipe validation, early stopping, schedules, losses, model building, local weights and the resume checks
(no services)."""

import math
import os

import pyarrow.fs as pafs
import pytest
import torch

from shards.dali import epoch_order
from training.config import ModelConfig, RecipeError, TrainRecipe, load_recipe
from training.engine import make_optimizer, make_scheduler, partition_ranks
from training.launch import check_where_overrides, resume_training, run_checkpoints
from training.losses import Loss, balanced_weights
from training.models import MultiHead, TemporalClassifier, build_model, count_parameters
from training.state import EarlyStopping, swa_start_epoch


def test_invalid_recipes_name_the_field_and_reason():
    with pytest.raises(RecipeError, match=r"data\.augment\.hflip: Input should be less than or equal to 1"):
        load_recipe("strip_ai_resnet50", ["data.augment.hflip=2"])
    with pytest.raises(RecipeError, match=r"swa\.enabled: needs deepspeed\.zero_stage <= 2"):
        load_recipe("strip_ai_resnet50", ["deepspeed.zero_stage=3"])
    with pytest.raises(RecipeError, match=r"data\.frames"):
        load_recipe("ct_ich_sequence_vivit", ["data.frames=0"])
    with pytest.raises(RecipeError, match=r"zoom: low 2.0 is above high 0.5"):
        load_recipe("brain_tumor_mri", ["data.augment.zoom=[2.0, 0.5]"])


def test_recipes_extend_and_keep_the_papers_values():
    r = load_recipe("strip_ai_swinv2_tiny")
    assert r.model.name == "swinv2_tiny_window16_256" and r.data.image_size == 256
    assert (r.optim.name, r.optim.lr) == ("adamw", 3e-4) and r.swa.enabled and r.early_stopping.enabled
    a = r.data.augment
    assert (a.hflip, a.vflip, a.rotate_p, a.sharpness_p, a.color_jitter_p) == (0.5,) * 5
    assert (a.sharpness_factor, a.brightness, a.saturation, a.hue) == (2.0, 0.2, 0.5, 0.5)
    rsna = load_recipe("rsna_ich_subtypes")
    assert rsna.optim.name == "sgd" and rsna.optim.momentum == 0.9 and rsna.schedule.name == "plateau"
    assert rsna.model.heads[0] == "any" and len(rsna.model.heads) == 6
    ct = load_recipe("ct_ich_sequence_vivit")
    assert ct.optim.lr == 5e-6 and ct.epochs == 20 and ct.model.freeze == "backbone"


def test_early_stopping_counts_epochs_without_improvement():
    es = EarlyStopping(mode="min", patience=2, min_delta=0.01)
    assert [es.update(v, e) for e, v in enumerate([1.0, 0.9, 0.895, 0.95, 0.5])] == [False, False, False, True, False]
    assert (es.best, es.best_epoch) == (0.5, 4)
    again = EarlyStopping.from_state(es.state_dict())
    assert again == es and not again.improved(math.nan)
    assert swa_start_epoch(0.8, 20) == 16 and swa_start_epoch(0.99, 1) == 0


def test_plateau_and_cosine_schedules():
    from training.config import ScheduleConfig

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], load_recipe("rsna_ich_binary").optim)
    plateau = make_scheduler(opt, ScheduleConfig(name="plateau", patience=1, factor=0.1), 10, "min")
    for v in (1.0, 1.0, 1.0):
        plateau.step(v)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], load_recipe("strip_ai_resnet50").optim)
    cosine = make_scheduler(opt, ScheduleConfig(name="cosine"), 4, "min")
    for _ in range(2):
        opt.step()  # as training orders them (without gradients it changes nothing); PyTorch warns otherwise
        cosine.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 / 2)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop"])
def test_fused_optimisers_step_like_pytorchs_reference_loop(name):
    from training.config import OptimConfig

    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=1e-2)
    ref_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(name)
    ref_cls = ref_cls or torch.optim.RMSprop
    start = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = make_optimizer([ours], cfg)
    kwargs = {} if name.startswith("adam") else {"momentum": cfg.momentum}
    ref_opt = ref_cls([ref], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False, **kwargs)
    for step in range(3):
        grad = torch.full_like(start, 0.5) * (step + 1) - start
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step(), ref_opt.step()
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    torch.testing.assert_close(ours.detach(), ref.detach())


def test_losses():
    assert balanced_weights([30, 10]) == [40 / 60, 40 / 20]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    weighted = Loss(False, [1.0, 3.0])(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert float(weighted) == pytest.approx(float((ce[0] + 3 * ce[1]) / 4))
    assert float(Loss(False, [1.0, 3.0])(logits, labels, class_weighted=False)) == pytest.approx(float(ce.mean()))
    ml = Loss(True, outputs=6)
    z, y = torch.zeros(1, 6), torch.tensor([[1, 0, 0, 0, 0, 0]])
    assert float(ml(z, y)) == pytest.approx(math.log(2))


def test_epoch_order_is_a_fresh_permutation_each_epoch():
    orders = [epoch_order(12, seed=3, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders[0] != orders[1] and orders[0] == epoch_order(12, seed=3, epoch=0)


def test_multi_head_temporal_and_head_only_models():
    heads = build_model(ModelConfig(name="resnet18", heads=["any", "a", "b"]), 3)
    assert isinstance(heads, MultiHead) and heads(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    video = build_model(ModelConfig(name="temporal:resnet18", freeze="backbone"), 2, frames=5)
    assert isinstance(video, TemporalClassifier) and video(torch.zeros(2, 5, 3, 32, 32)).shape == (2, 2)
    assert not any(p.requires_grad for p in video.backbone.parameters())
    frozen = build_model(ModelConfig(name="resnet18", freeze="backbone"), 4)
    assert count_parameters(frozen) == 512 * 4 + 4


def test_timm_weights_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "resnet18.safetensors"))
    cfg = ModelConfig(name="resnet18", pretrained=True, weights=str(tmp_path / "resnet18.safetensors"))
    model = build_model(cfg, 3)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.get_classifier().out_features == 3  # the file's 1000-class head was dropped


def test_a_model_that_would_fail_in_every_worker_is_refused_on_the_driver(tmp_path):
    from training.config import RecipeError
    from training.models import check_model

    with pytest.raises(RecipeError, match=r"model.name: timm has no model 'resnet_50' \(closest: resnet50"):
        check_model(ModelConfig(name="resnet_50"))
    with pytest.raises(RecipeError, match=r"model\.name: timm has no model 'convnxt_tiny'"):
        check_model(ModelConfig(name="temporal:convnxt_tiny"))
    missing = str(tmp_path / "w.safetensors")
    with pytest.raises(RecipeError, match=f"model.weights: no file or folder {missing}"):
        check_model(ModelConfig(name="resnet18", pretrained=True, weights=missing))
    (tmp_path / "w.safetensors").touch()
    for fine in (
        ModelConfig(name="resnet18", pretrained=True, weights=missing),
        ModelConfig(name="resnet18", pretrained=False, weights=str(tmp_path / "other.pth")),  # not used
        ModelConfig(name="resnet18", pretrained=True, weights="timm/resnet18.a1_in1k"),  # a hub id
        ModelConfig(name="vivit", pretrained=True, weights="google/vivit-b-16x2-kinetics400"),
        ModelConfig(name="temporal:resnet18"),
    ):
        check_model(fine)


def test_vivit_weights_from_a_local_folder(tmp_path):
    from transformers import VivitConfig, VivitForVideoClassification

    tiny = VivitConfig(
        image_size=32,
        num_frames=4,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=400,
    )
    VivitForVideoClassification(tiny).save_pretrained(tmp_path / "vivit")
    cfg = ModelConfig(name="vivit", pretrained=True, weights=str(tmp_path / "vivit"), freeze="backbone")
    model = build_model(cfg, 2, frames=4, image_size=32)
    assert model(torch.zeros(1, 4, 3, 32, 32)).shape == (1, 2)
    assert count_parameters(model) == 48 * 2 + 2


def test_a_checkpoint_without_model_states_is_refused_by_name(tmp_path):
    from training.launch import check_checkpoint

    ckpt = tmp_path / "checkpoint_000001"
    (ckpt / "checkpoint").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="checkpoint_000001 to start from holds no model states"):
        check_checkpoint(str(ckpt), None)
    with pytest.raises(FileNotFoundError, match="checkpoint_000001 to resume from holds no model states"):
        check_checkpoint(str(ckpt), None, "to resume from")
    with pytest.raises(FileNotFoundError, match="gone_000002"):  # pruned away entirely
        check_checkpoint(str(tmp_path / "gone_000002"), None)
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    check_checkpoint(str(ckpt), None)


def test_checkpoints_of_a_run_and_their_zero_partitions(tmp_path):
    folder = tmp_path / "demo_tiles-0123456789ab"
    older = folder / "checkpoint_2026-11-30_10-00-00.000000" / "ds"
    newer = folder / "checkpoint_2026-11-30_11-00-00.000000" / "ds"
    for path in (newer, older, folder / "not_a_checkpoint"):
        path.mkdir(parents=True)
    for rank in range(2):  # ZeRO-1/2: each rank's optimiser partition
        (older / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    for rank in range(3):  # ZeRO-3: each rank's parameter and optimiser partitions
        (newer / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
        (newer / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
    found = run_checkpoints(str(folder), pafs.LocalFileSystem())
    assert [c.base_name for c in found] == [older.parent.name, newer.parent.name]  # oldest first, nothing else
    assert [partition_ranks(c.path) for c in found] == [2, 3]
    (older.parent / "stage0" / "ds").mkdir(parents=True)
    assert partition_ranks(older.parent / "stage0") == 0 and partition_ranks(tmp_path / "missing") == 0


def test_resume_changes_only_where_a_run_continues():
    only = (
        r"--resume changes only workers, cpus_per_worker, placement, tracking\.outage_wait_s, data\.outage_wait_s "
        r".*'epochs=9'"
    )
    with pytest.raises(RecipeError, match=only):
        resume_training("0123456789abcdef", "http://127.0.0.1:1", "/nowhere", ["workers=2", "epochs=9"])
    check_where_overrides(
        ["workers=4", "cpus_per_worker=2", "placement=spread", "tracking.outage_wait_s=1200", "data.outage_wait_s=900"]
    )
    with pytest.raises(RecipeError, match=r"tracking\.uri"):
        check_where_overrides(["tracking.uri=http://elsewhere"])


def test_the_universal_form_is_removed_when_the_last_living_reader_leaves(tmp_path, monkeypatch):
    """A worker killed while it loads the node's shared universal checkpoint must not keep it on disk for good."""
    import subprocess
    import sys

    import training.engine
    from training.engine import universal_checkpoint

    converted = []

    def to_universal(checkpoint_dir, out, tag):
        converted.append(out)
        (out / tag).mkdir(parents=True)

    monkeypatch.setattr(training.engine, "to_universal", to_universal)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with universal_checkpoint(tmp_path / "ckpt", "latest") as folder:
        readers = folder.with_name(f"{folder.name}.readers")
        (readers / f"{int(finished.stdout)}-killed").touch()  # a worker of the node, killed while loading
        (readers / "0123abcd").touch()  # a reader file named before readers named their process
    assert converted == [folder]
    assert not folder.exists() and not readers.exists()
    assert not folder.with_name(f"{folder.name}.lock").exists()  # its lock file went with it


def test_the_node_lock_excludes_and_its_last_holder_may_remove_it(tmp_path):
    """Two holders never at once, though the first deletes the file the second waits on: the second takes the
    lock again on the file made anew, which it may remove in turn."""
    import threading
    import time

    from training.engine import node_lock

    path, events = tmp_path / "x.lock", []

    def second():
        with node_lock(path) as remove:
            events.append(("second in", path.exists()))
            remove()

    with node_lock(path) as remove:
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)  # the waiter blocks on the file now
        events.append(("first out", path.exists()))
        remove()
    waiter.join(timeout=10)
    assert events == [("first out", True), ("second in", True)] and not path.exists()


def test_a_run_registers_one_model_version_however_often_it_ends(mlflow_uri, tmp_path):
    """``--resume`` of a run ends it again: its model, exported into the same folder, keeps its one version."""
    from mlflow import MlflowClient

    from training.tracking import register_model

    uri = mlflow_uri
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", str(tmp_path / "artifacts"))
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    assert register_model(uri, first, "recipe") is None  # nothing exported yet
    for run_id in (first, second):
        (tmp_path / "model.json").write_text("{}")
        client.log_artifact(run_id, str(tmp_path / "model.json"), "model")
    assert register_model(uri, first, "recipe") == register_model(uri, first, "recipe") == "1"
    assert register_model(uri, second, "recipe") == "2"
    assert sorted(str(v.version) for v in client.search_model_versions("name='recipe'")) == ["1", "2"]


def test_a_runs_worker_group_polls_every_half_second_and_prints_once_unless_the_environment_says(monkeypatch):
    from training.launch import RAY_TRAIN_ENV, worker_group

    recipe = load_recipe("demo_tiles", ["use_gpu=false", "workers=3"])
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "")  # restored to what it was afterwards
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # a user's choice stays
    group = worker_group(recipe, {"recipe": recipe.model_dump()})
    assert group["scaling_config"].num_workers == 3 and group["torch_config"].backend == "gloo"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == RAY_TRAIN_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    # Ray Train hands these from the driver to the run's controller and workers
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert set(RAY_TRAIN_ENV) <= ENV_VARS_TO_PROPAGATE


def test_a_worker_group_given_no_datasets_starts_no_dataset_manager():
    """Ray Train's trainer starts a dataset manager actor for every worker group; Tessera's read with DALI and are
    given no Ray Data datasets, so theirs leave it out, and only it. Given datasets, the trainer is Ray's own."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from training.trainer import torch_trainer

    def kinds(trainer) -> list[str]:
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    scaling = ScalingConfig(num_workers=1)
    given = torch_trainer(lambda: None, scaling_config=scaling, datasets={"train": lambda: None})
    assert type(given) is TorchTrainer and DatasetsCallback.__name__ in kinds(given)
    none = torch_trainer(lambda: None, scaling_config=scaling)
    assert isinstance(none, TorchTrainer) and kinds(none) == [k for k in kinds(given) if k != DatasetsCallback.__name__]


@pytest.mark.parametrize("gpus, workers, on_gpu", [(1, 2, False), (2, 2, True), (0, 1, False)])
def test_auto_workers_are_told_whether_their_group_has_gpus(monkeypatch, capsys, gpus, workers, on_gpu):
    """On a one-GPU machine a two-worker group runs on CPUs, and its workers must not take CUDA device 0 and 1
    themselves (seen on an H200: rank 1's "invalid device ordinal"): they get ``use_gpu`` as decided."""
    import training.capacity
    from training.launch import worker_group
    from training.loop import worker_device

    monkeypatch.setattr(training.capacity, "gpus_held", lambda: gpus)
    recipe = load_recipe("demo_tiles", [f"workers={workers}"])
    assert recipe.use_gpu == "auto"
    config = {"recipe": recipe.model_dump(), "run_id": "r"}
    group = worker_group(recipe, config)
    sent = group["train_loop_config"]
    assert sent["recipe"]["use_gpu"] is on_gpu and sent["run_id"] == "r" and config["recipe"]["use_gpu"] == "auto"
    assert group["scaling_config"].use_gpu is on_gpu
    assert group["torch_config"].backend == ("nccl" if on_gpu else "gloo")
    said = capsys.readouterr().out
    assert ("1 GPU(s) for 2 workers, so they run on CPUs; with workers=1 they would run on the GPUs" in said) is (
        gpus == 1
    )
    if not on_gpu:  # whatever this machine has, a worker of a CPU group stays on the CPU
        assert worker_device(TrainRecipe.model_validate(sent["recipe"])).type == "cpu"


def test_a_cpu_worker_on_a_gpu_machine_points_deepspeed_at_the_cpu(monkeypatch):
    """DeepSpeed takes CUDA wherever torch sees a GPU and puts rank r on CUDA device r; a CPU worker there must
    name the CPU, also where deepspeed was imported before with CUDA chosen."""
    from deepspeed.accelerator import get_accelerator, real_accelerator

    from training.engine import deepspeed_on

    class Cuda:  # what DeepSpeed chose in a process that imported it on a GPU machine
        def device_name(self, index=None):
            return "cuda"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "")  # both restored to what they were afterwards
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", Cuda())
    deepspeed_on(True)  # a GPU worker keeps it
    assert get_accelerator().device_name() == "cuda" and "DS_ACCELERATOR" not in os.environ
    deepspeed_on(False)
    assert get_accelerator().device_name() == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"
