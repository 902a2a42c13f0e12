"""The ImageNet recipes through the CLI (`asyncpred fit --config recipes/<x>.yaml`) on a generated folder.

Only what a CPU needs is overridden: accelerator/devices/precision, the data root, a tiny image size
(64: NiN needs >= 55), 3 classes, 2 steps, no logger. The recipes' strategy is ``async_pred`` with its defaults (the
p2p transport, the shared batch pool): on one process the tests select ``transport allreduce`` (p2p needs 2 ranks);
the 2-rank test runs the recipe's strategy as written. The launch scripts are checked with ``--print_config``.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lightning_asyncpred.cli import main
from lightning_asyncpred.data import dali as dali_backend
from tests.imagenet_fixtures import make_imagenet_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"nin": "nin.yaml", "resnet50": "resnet50.yaml", "googlenet": "googlenet.yaml"}
needs_dali = pytest.mark.skipif(not dali_backend.dali_available(), reason="needs the [dali] extra")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, n_train=6, n_val=2)


def cpu_args(recipe, root, run_dir, *extra, one_process=True):
    return [
        "fit",
        "--config", os.path.join(REPO, "recipes", recipe),
        "--data.root", str(root),
        "--data.image_size", "64",
        "--data.val_resize", "72",
        "--data.batch_size", "4",
        "--data.num_threads", "1",
        "--model.num_classes", "3",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "32-true",
        "--trainer.max_steps", "2",
        "--trainer.logger", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        *(["--trainer.strategy.init_args.transport", "allreduce"] if one_process else []),
        *extra,
    ]


@needs_dali
@pytest.mark.parametrize("name", ["nin", "resnet50", "googlenet"])
def test_recipe_fit_through_cli(folder, tmp_path, capsys, name):
    main(cpu_args(RECIPES[name], folder, tmp_path, "--test_after_fit", "true"))
    out = capsys.readouterr().out
    assert "strategy: AsyncPredStrategy, world size 1, steps 2" in out
    assert "test: test/acc1" in out  # the DALI val pipeline ran through the CLI as well
    assert "prediction error ratio" in out or "staleness" in out


def test_nin_recipe_torchvision_backend(folder, tmp_path, capsys):
    main(cpu_args("nin.yaml", folder, tmp_path, "--data.backend", "torchvision", "--data.pin_memory", "false"))
    assert "steps 2" in capsys.readouterr().out


def test_recipe_reports_too_few_model_classes(folder, tmp_path):
    args = cpu_args("nin.yaml", folder, tmp_path, "--data.backend", "torchvision", "--model.num_classes", "2")
    with pytest.raises(ValueError, match="has 3 classes but the model has num_classes=2"):
        main(args)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_contents(name):
    with open(os.path.join(REPO, "recipes", RECIPES[name])) as fh:
        cfg = yaml.safe_load(fh)
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    assert trainer["strategy"]["class_path"] == "lightning_asyncpred.AsyncPredStrategy"
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    assert trainer["strategy"]["init_args"] == {}  # async_pred's defaults: p2p, the pool, the owners' look-ahead
    callbacks = {cb["class_path"]: cb.get("init_args", {}) for cb in trainer["callbacks"]}
    assert "lightning_asyncpred.StalenessMonitor" in callbacks
    assert callbacks["pytorch_lightning.callbacks.ModelCheckpoint"] == {"every_n_train_steps": 500, "save_last": True}
    assert model["arch"] == name and model["num_classes"] == 1000
    assert model["lr_base_batch"] > 0  # lr scaled to the global batch
    assert data["class_path"] == "lightning_asyncpred.data.ImageNetDataModule"
    assert data["init_args"]["backend"] == "dali" and data["init_args"]["image_size"] == 224
    published = {
        "resnet50": dict(lr=0.256, lr_base_batch=256, lr_schedule="cosine", warmup_epochs=8, label_smoothing=0.1, batch=256),
        "googlenet": dict(lr=0.01, lr_base_batch=32, lr_schedule="poly", poly_power=0.5, weight_decay=2e-4, batch=32),
        "nin": dict(lr=0.01, lr_schedule="step", momentum=0.9, weight_decay=5e-4, batch=128),
    }[name]
    assert data["init_args"]["batch_size"] == published.pop("batch")
    for key, value in published.items():
        assert model[key] == value, key


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    path = os.path.join(REPO, "recipes", "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert "asyncpred" in text or "lightning_asyncpred.cli" in text


def _torchrun_sh(tmp_path, **env_vars):
    """Run recipes/launch/torchrun.sh with a fake ``torchrun`` that prints its arguments."""
    import sys

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "torchrun").write_text('#!/usr/bin/env bash\necho "torchrun $*"\n')
    (fake / "torchrun").chmod(0o755)
    path = f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "DATA": str(tmp_path), **env_vars}
    return subprocess.run(["bash", os.path.join(REPO, "recipes", "launch", "torchrun.sh"), "nin"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_torchrun_script_counts_the_gpus_torch_sees(tmp_path):
    # no GPU visible (this machine, or CUDA_VISIBLE_DEVICES=""): a clear error, not a launch of 0 processes
    proc = _torchrun_sh(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no GPU visible to torch (CUDA_VISIBLE_DEVICES=); set GPUS_PER_NODE" in proc.stderr
    proc = _torchrun_sh(tmp_path, GPUS_PER_NODE="2", NNODES="3")
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[args.index("--nproc-per-node") + 1] == "2" and args[args.index("--trainer.devices") + 1] == "2"
    assert args[args.index("--nnodes") + 1] == "3" and args[args.index("--trainer.num_nodes") + 1] == "3"


@needs_dali
@pytest.mark.slow
def test_nin_recipe_two_ranks_shards_dali(folder, tmp_path):
    """2 CPU ranks (Gloo) with the recipe's AsyncPredStrategy as written (p2p, the shared batch pool feeding DALI):
    one epoch of the 18 training images is 5 batches of 4 over both ranks, split by speed, and no rank hangs."""
    import sys

    args = cpu_args("nin.yaml", folder, tmp_path, "--test_after_fit", "true", one_process=False)
    args[args.index("--trainer.devices") + 1] = "2"
    args[args.index("--trainer.max_steps") + 1] = "-1"
    # the recipe's channels_last stays on: the replica checksum must hash 1x1-conv weights in that layout
    args += ["--trainer.max_epochs", "1"]
    # in-process fits before this test leave Lightning's launch variables (MASTER_PORT, LOCAL_RANK, ...) in
    # os.environ and their process group's store bound to MASTER_PORT: start the 2 ranks from a clean env
    launch_vars = {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("PL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_asyncpred.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy: AsyncPredStrategy, world size 2, steps " in proc.stdout
    assert "test: test/acc1" in proc.stdout


_FAKE = {  # a launcher that runs the command it would launch, once, with --print_config
    "torchrun": 'while [ "$1" != "-m" ]; do shift; done; shift; m="$1"; shift; exec python -m "$m" "$@" --print_config',
    "horovodrun": 'while [ "$1" != "python" ]; do shift; done; shift; exec python "$@" --print_config',
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@" --print_config',
}


@pytest.mark.parametrize("script, transport", [("torchrun.sh", "p2p"), ("slurm.sbatch", "p2p"),
                                               ("horovodrun.sh", "horovod")])
def test_launch_scripts_resolve_the_recipe_with_print_config(tmp_path, script, transport):
    """Each launch script, its launcher replaced by one that runs the command with --print_config: the configuration
    parses, with the transport the script means (torchrun and SLURM: the recipe's p2p; horovodrun: horovod), the
    step checkpoints on the global clock, and the devices and nodes the script sets."""
    import sys

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in _FAKE.items():
        (fake / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "DATA": str(tmp_path),
           "GPUS_PER_NODE": "2", "NNODES": "3", "HOSTS": "a:2,b:2,c:2", "SLURM_CPUS_PER_TASK": "4",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "3", "SLURM_SUBMIT_DIR": REPO}
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", "launch", script), "nin"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    trainer = cfg["trainer"]
    assert str(trainer["devices"]) == "2" and trainer["num_nodes"] == 3
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lightning_asyncpred.AsyncPredStrategy"
    assert strategy["init_args"]["transport"] == transport
    callbacks = {cb["class_path"]: cb.get("init_args", {}) for cb in trainer["callbacks"]}
    assert callbacks["pytorch_lightning.callbacks.ModelCheckpoint"]["every_n_train_steps"] == 500
    assert cfg["data"]["init_args"]["root"] == str(tmp_path)
