"""examples/nemo_run/pretrain.py: argument checks, the --dryrun Slurm script, a local run."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

from training_helpers import ROOT, assert_losses_close, make_tiny_data, read_golden, \
    read_jsonl_losses, tiny_overrides

LAUNCHER = ROOT / "examples" / "nemo_run" / "pretrain.py"
CONFIG = "tests/assets/configs/tiny_train.yaml"
needs_nemo_run = pytest.mark.skipif(importlib.util.find_spec("nemo_run") is None,
                                    reason="nemo-run missing: pip install -r "
                                           "requirements/launch.txt (make setup does)")


def launch(args: list[str], home, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launcher_module():
    spec = importlib.util.spec_from_file_location("nemo_run_pretrain", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    ([], "--account is required"),
    (["--account", "a", "--job-dir", "rel/dir"], "--job-dir rel/dir must be an absolute"),
    (["--account", "a", "--nodes", "0"], "--nodes is 0"),
    (["--account", "a", "--set", "checkpoint.save_dir=runs/x"], "checkpoint.save_dir 'runs/x' "
                                                                 "is relative"),
    (["--account", "a", "--set", "training.trian_steps=3"], "did you mean"),
    (["--local", "--nodes", "2"], "--local runs on this machine only"),
    (["--account", "a", "--set", "data.text.tokenizer_path=.cache/none/tokenizer.json"],
     "neither committed nor present"),
])
def test_bad_arguments_are_one_line_errors(launcher_module, capsys, argv, message):
    assert launcher_module.main(["--config", CONFIG, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_argparse_errors_are_one_line_too(launcher_module, capsys):
    with pytest.raises(SystemExit) as exc:
        launcher_module.main(["--nodes", "two", "--config", CONFIG])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err


@needs_nemo_run
def test_dryrun_slurm_script(tmp_path):
    """docs/launching.md: the NeMo-Run Slurm command, printed with --dryrun."""
    tokenizer = ROOT / ".cache" / "launch_test" / "tokenizer.json"   # untracked, ignored dir
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_text("{}")
    source = "data.sources=[{paths: '/shared/my data/*.tar'}]"
    try:
        proc = launch(["--config", CONFIG, "--account", "acc", "--partition", "cpu",
                       "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "2",
                       "--container", "nvcr.io/nvidia/pytorch:25.09-py3",
                       "--mount", "/lustre:/lustre", "--job-dir", "~/nemo-run/genlip",
                       "--set", source, "checkpoint.save_dir=/lustre/ckpt/tiny",
                       "data.text.tokenizer_path=.cache/launch_test/tokenizer.json",
                       "--dryrun"], home=tmp_path)
    finally:
        tokenizer.unlink()
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --account=acc",
                 "#SBATCH --partition=cpu"):
        assert line in out, out
    assert "gpus" not in out.split("# setup")[0].lower(), "CPU partition: no GPU request"
    assert f"--output={tmp_path}/nemo-run/genlip/" in out and "~" not in out, out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)  # what bash hands to torchrun: the override survives as one item
    torchrun = argv[argv.index("torchrun"):]
    assert torchrun[torchrun.index("--nnodes") + 1] == "2"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "2"
    assert torchrun[torchrun.index("--node-rank") + 1] == "$SLURM_NODEID"
    assert torchrun[torchrun.index("pretrain_genlip.py"):] == [
        "pretrain_genlip.py", "--config", CONFIG, "--set", source,
        "checkpoint.save_dir=/lustre/ckpt/tiny",
        "data.text.tokenizer_path=.cache/launch_test/tokenizer.json"]
    assert "--container-image nvcr.io/nvidia/pytorch:25.09-py3" in srun
    assert "/lustre:/lustre" in srun


@needs_nemo_run
def test_git_packager_ships_the_untracked_tokenizer(launcher_module, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # invoke (git archive) reads stdin
    tokenizer = ROOT / ".cache" / "launch_test" / "tok.json"   # untracked, in an ignored dir
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_text("{}")
    try:
        args = launcher_module.parse_args(
            ["--config", CONFIG, "--account", "a", "--job-dir", str(tmp_path / "jobs"),
             "--set", "data.text.tokenizer_path=.cache/launch_test/tok.json"])
        ship = launcher_module.validate(args)
        assert ship == [".cache/launch_test/tok.json"]
        executor = launcher_module.build_executor(args, ship)
        archive = executor.packager.package(ROOT, str(tmp_path), "code")
    finally:
        tokenizer.unlink()
    names = tarfile.open(archive).getnames()
    assert any(n.endswith("pretrain_genlip.py") for n in names)
    assert any(n.endswith(".cache/launch_test/tok.json") for n in names), names[-20:]


@needs_nemo_run
def test_local_executor_runs_a_few_steps(tmp_path):
    """docs/launching.md: NeMo-Run on this machine (torchrun, 2 processes)."""
    data = make_tiny_data(tmp_path / "data")
    sets = tiny_overrides(data, tmp_path / "run", training__train_steps=2)
    proc = launch(["--config", CONFIG, "--local", "--nproc-per-node", "2", "--set", *sets],
                  home=tmp_path, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "RUN steps=2 " in out, out[-3000:]
    # Steps 1-2 use the same LR as the 8-step golden run (warmup), so the losses agree.
    golden = read_golden()
    assert_losses_close(read_jsonl_losses(tmp_path / "run" / "metrics.jsonl"),
                        {s: golden[s] for s in (1, 2)}, what="NeMo-Run local, 2 ranks")
