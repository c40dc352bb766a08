"""Slurm: the preflight, the job scripts, their submit-time check and multi-node runs on a real local
Slurm (2 emulated nodes).

The cluster (tests/slurm_cluster.py) is installed with apt when missing and started once per module;
tests that need it are skipped only where it cannot be installed (not root / no apt-get).
Every test has a hard timeout (300 s where the cluster is used: the first one may include the
apt-get install); tests that use the cluster are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from megatron_llamapro.runtime.multiproc import free_port
from megatron_llamapro.runtime.preflight import PreflightError, check_allocation
from tests.lib import run_tool, training_iterations
from tests.slurm_cluster import SlurmCluster, ensure_mpi4py, slurm_available

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_SH = REPO / "slurm" / "pretrain_expand.sh"
PY = sys.executable
PREEMPTION_EXIT_CODE = 75

# 2 emulated nodes x 1 CPU task each, no GPUs, overriding the script's GPU-cluster defaults.
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if not slurm_available():
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no file {path})"


def _steps_launched(cluster: SlurmCluster, job_id: int) -> list[str]:
    """Job steps the slurmds were asked to launch for this job (from their logs)."""
    steps = []
    for log in cluster.log_dir.glob("slurmd-*.log"):
        steps += re.findall(rf"launch task StepId=({job_id}\.\d+)", _read(log))
    return steps


@pytest.fixture(scope="module")
def llamapro_inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny expanded checkpoint and tokenized data, made with the project's own CLIs:
    random HF LLaMA (4 layers, h 64, vocab 300, sentencepiece tokenizer trained on a synthetic corpus)
    -> tools/convert_hf_to_megatron.py -> tools/expand_blocks.py (+2 blocks) ; tools/preprocess_data.py."""
    from megatron_llamapro.data import synthetic
    from tests import fixtures

    root = tmp_path_factory.mktemp("llamapro_inputs")
    general, domain = synthetic.general_corpus(300, seed=1), synthetic.domain_corpus(300, seed=1)
    # Vocab 300 leaves room for ~40 characters next to the 256 byte pieces: train on lowercased
    # letters; everything else (capitals, digits, code) is tokenized through byte fallback.
    plain = [re.sub(r"[^a-z .]", "", text.lower()) for text in general]
    tok = synthetic.train_sentencepiece(plain, vocab_size=300, out_dir=root / "tok")
    hf = fixtures.make_tiny_hf(root / "hf", num_layers=4, num_heads=4, num_kv_heads=4, tie=False,
                               vocab=300, tokenizer_model=tok)
    run_tool("convert_hf_to_megatron", "--hf-dir", str(hf), "--out", str(root / "base"),
             "--tp", "1", "--pp", "1", "--format", "torch_dist", check=True)
    run_tool("expand_blocks", "--in", str(root / "base"), "--out", str(root / "expanded"),
             "--num-new-blocks", "2", "--workers", "1", check=True)
    prefixes = {}
    for name, texts in (("general", general), ("domain", domain)):
        jsonl = synthetic.write_jsonl(texts, root / "raw" / f"{name}.jsonl")
        run_tool("preprocess_data", "--input", str(jsonl), "--tokenizer-type", "sentencepiece",
                 "--tokenizer-model", str(tok), "--output-prefix", str(root / "data" / name),
                 "--workers", "1", "--append-eod", check=True)
        prefixes[name] = str(root / "data" / f"{name}_text_document")
    chat = synthetic.write_records(synthetic.chat_samples(120), root / "raw" / "chat.jsonl")
    run_tool("preprocess_data", "--chat", "--input", str(chat), "--tokenizer-model", str(root / "expanded"),
             "--output-prefix", str(root / "data" / "chat"), check=True)
    return {
        "HF_DIR": str(hf),
        "CHAT": str(root / "data" / "chat_chat_document"),
        "LOAD": str(root / "expanded"),
        "DATA_PATH": f"1.0 {prefixes['general']} 1.0 {prefixes['domain']}",
        "VALID_DATA": f"general={prefixes['general']} domain={prefixes['domain']}",
    }


def _train_env(inputs: dict[str, str], save: Path, **overrides: str) -> dict[str, str]:
    env = dict({k: inputs[k] for k in ("LOAD", "DATA_PATH", "VALID_DATA")}, SAVE=str(save), TP="1", PP="2", MBS="1", GBS="2", SEQ_LEN="32", LR="1e-3",
               TRAIN_ITERS="6", SAVE_INTERVAL="2", EVAL_INTERVAL="3", PYTHON=PY,
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    env.update(overrides)
    return env


# Trainer flags beyond the ones the job script always passes.
TRAINER_ARGS = ["--log-interval", "1", "--eval-iters", "1"]


def _tracker(save: Path) -> str | None:
    path = save / "latest_checkpointed_iteration.txt"
    return path.read_text().strip() if path.exists() else None


# --------------------------------------------------------------------------- preflight (no Slurm)
@pytest.mark.timeout(30)
@pytest.mark.parametrize("world,tp,pp,gbs,mbs,dp", [
    (16, 1, 1, 1024, 1, 16), (16, 2, 2, 1024, 2, 4), (2, 1, 2, 2, 1, 1), (8, 8, 1, 3, 3, 1), (1, 1, 1, 1, 1, 1),
])
def test_slurm_preflight_accepts(world, tp, pp, gbs, mbs, dp):
    assert check_allocation(world, tp, pp, gbs, mbs) == dp


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world,tp,pp,gbs,mbs,expected", [
    (3, 2, 1, 8, 1, "allocation of 3 tasks (nodes x tasks-per-node) is not a multiple of TP x PP = 2 x 1"),
    (16, 4, 3, 8, 1, "allocation of 16 tasks (nodes x tasks-per-node) is not a multiple of TP x PP = 4 x 3 = 12"),
    (2, 4, 1, 8, 1, "allocation of 2 tasks"),
    (16, 2, 1, 12, 1, "global batch size 12 is not a multiple of DP x MBS = 8 x 1 = 8"),
    (4, 1, 1, 8, 3, "global batch size 8 is not a multiple of DP x MBS = 4 x 3 = 12"),
    (0, 1, 1, 8, 1, "world size must be a positive integer, got 0"),
])
def test_slurm_preflight_rejects_with_one_line(world, tp, pp, gbs, mbs, expected):
    with pytest.raises(PreflightError) as info:
        check_allocation(world, tp, pp, gbs, mbs)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.timeout(30)
def test_slurm_preflight_needs_a_gpu_per_task():
    assert check_allocation(16, 2, 1, 64, 1, tasks_per_node=8, gpus_per_node=8) == 8
    assert check_allocation(2, 1, 1, 2, 1, tasks_per_node=1, gpus_per_node=0) == 2     # CPU tasks
    with pytest.raises(PreflightError) as info:
        check_allocation(16, 2, 1, 64, 1, tasks_per_node=8, gpus_per_node=4)
    assert str(info.value) == ("8 tasks per node but 4 GPU(s) per node: each task needs a GPU of its own "
                               "(make --ntasks-per-node at most --gpus-per-node, or --gpus-per-node=0 for CPU tasks)")


@pytest.mark.timeout(60)
def test_slurm_preflight_cli():
    def cli(*args):
        return subprocess.run([PY, "-m", "megatron_llamapro.runtime.preflight", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=30)

    bad = cli("--world-size", "3", "--tp", "2", "--pp", "1", "--global-batch-size", "8", "--micro-batch-size", "1")
    assert bad.returncode == 2
    lines = (bad.stdout + bad.stderr).strip().splitlines()
    assert lines == ["preflight: error: allocation of 3 tasks (nodes x tasks-per-node) is not a multiple "
                     "of TP x PP = 2 x 1 = 2"]
    good = cli("--world-size", "16", "--tp", "2", "--pp", "2", "--global-batch-size", "64", "--micro-batch-size", "2")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("preflight: ok: 16 tasks = TP 2 x PP 2 x DP 4")


@pytest.mark.timeout(30)
def test_slurm_job_scripts_parse():
    for script in ("pretrain_expand.sh", "convert.sh", "expand.sh"):
        path = REPO / "slurm" / script
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        text = path.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH" in text


# --------------------------------------------------------------------------- the job script, no Slurm
# The job script's own variables, kept out of the environment the tests inherit.
SCRIPT_VARS = ("SFT", "LOAD", "DATA_PATH", "VALID_DATA", "SAVE", "TP", "PP", "VPP", "MBS", "GBS", "SEQ_LEN",
               "TRAIN_ITERS", "LR", "FP8", "SAVE_INTERVAL", "EVAL_INTERVAL", "PYTHON", "CONTAINER_IMAGE",
               "CONTAINER_MOUNTS", "EXTRA_ARGS", "LAUNCHER", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
               "MAX_REQUEUES", "TASK_EXIT_WAIT", "REPO_DIR", "PREFLIGHT_PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _login_env(base: dict[str, str] | None = None, **env: str) -> dict[str, str]:
    """A login node's environment: no allocation (no SLURM_*), none of the script's variables but `env`."""
    base = dict(os.environ if base is None else base)
    kept = {k: v for k, v in base.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) or k == "SLURM_CONF"}
    return {**{k: v for k, v in kept.items() if k not in SCRIPT_VARS}, **env}


def _script(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PRETRAIN_SH), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _lines(r: subprocess.CompletedProcess) -> list[str]:
    return (r.stdout + r.stderr).strip().splitlines()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env,expected", [
    ({}, ["pretrain_expand.sh: error: SLURM_JOB_ID is not set: this is the job script; submit it with sbatch or "
          "'slurm/pretrain_expand.sh --submit [sbatch options]' (checks the settings first), or run it inside an "
          "allocation"]),
    ({"SLURM_JOB_ID": "123"},
     ["pretrain_expand.sh: error: LOAD is not set: the expanded checkpoint to train (tools/expand_blocks.py --out)",
      'pretrain_expand.sh: error: DATA_PATH is not set: the training blend "W1 PREFIX1 W2 PREFIX2 ..." or one PREFIX']),
    ({"SLURM_JOB_ID": "123", "LOAD": "ckpt", "DATA_PATH": "data/x", "TP": "two", "MBS": ""},
     ["pretrain_expand.sh: error: TP must be an integer >= 1, got 'two'"]),
    ({"SLURM_JOB_ID": "123", "LOAD": "ckpt", "DATA_PATH": "data/x"},
     ["pretrain_expand.sh: error: SLURM_JOB_NODELIST is not set: cannot take MASTER_ADDR from the allocation's "
      "first host; set MASTER_ADDR"]),
], ids=["no-allocation", "no-load-no-data", "bad-integer", "no-nodelist"])
def test_slurm_job_script_missing_variables_give_plain_errors(tmp_path, env, expected):
    """Run outside an allocation (or with parts of one missing): one `error:` line per missing or bad
    variable, never bash's `${VAR:?}` or `unbound variable` messages."""
    r = _script([], _login_env(**env), cwd=tmp_path, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert _lines(r) == expected


def check_ok(inputs) -> str:
    return ("check: ok: world size 2 = TP 1 x PP 2 x DP 1; 2 micro-batch(es) of 1 per step per DP rank; "
            f"global batch 2; starts from --load {inputs['LOAD']} (torch_dist); trains layers [2, 5]")


def rounding_warning(inputs) -> str:
    """The job trains bf16 (the script's default) from the fp32 expanded checkpoint, saving full checkpoints."""
    load = inputs["LOAD"]
    return (f"warning: --load {load} holds fp32 weights and --precision bf16 stores the frozen layers rounded to "
            "bf16 in every saved checkpoint (they stay exactly the base's only with --fp32 or --save-trainable-only; "
            f"or rewrite the base in bf16 first: tools/reshard.py --in {load} --out {load}-bf16 --dtype bf16)")


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("overrides,sbatch_args,expected", [
    ({}, ["--nodes=3"],
     ["preflight: error: allocation of 3 tasks (nodes x tasks-per-node) is not a multiple of TP x PP = 1 x 2 = 2"]),
    (dict(DATA_PATH="1.0 {tmp}/no-data"), [], ["error: dataset file not found: {tmp}/no-data.bin"]),
    (dict(PP="1", GBS="3"), [],
     ["preflight: error: global batch size 3 is not a multiple of DP x MBS = 2 x 1 = 2 "
      "(DP = 2 tasks / (TP x PP = 1 x 1))"]),
    (dict(LOAD="{tmp}/no-ckpt"), [], ["error: --load {tmp}/no-ckpt: no such checkpoint directory"]),
    ({}, ["--ntasks-per-node=2", "--gpus-per-node=1"],
     ["preflight: error: 2 tasks per node but 1 GPU(s) per node: each task needs a GPU of its own "
      "(make --ntasks-per-node at most --gpus-per-node, or --gpus-per-node=0 for CPU tasks)"]),
    (dict(TP="x", LOAD=""), ["--nodes=2-4"],
     ["pretrain_expand.sh: error: --nodes=2-4: the check needs one node count (a min-max range leaves the task "
      "count open)",
      "pretrain_expand.sh: error: LOAD is not set: the expanded checkpoint to train (tools/expand_blocks.py --out)",
      "pretrain_expand.sh: error: TP must be an integer >= 1, got 'x'"]),
], ids=["tp-pp-vs-nodes", "missing-data", "gbs", "missing-load", "gpus-per-node", "settings"])
def test_slurm_check_reports_each_problem_in_one_line(tmp_path, llamapro_inputs, overrides, sbatch_args, expected):
    """`pretrain_expand.sh --check [sbatch options]` on a login node (no allocation, no cluster needed)."""
    tmp = str(tmp_path)
    env = _train_env(llamapro_inputs, tmp_path / "save", **{k: v.format(tmp=tmp) for k, v in overrides.items()})
    r = _script(["--check", *CPU_JOB, *sbatch_args], _login_env(**env, REPO_DIR=str(REPO)), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert _lines(r) == [line.format(tmp=tmp) for line in expected]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_check_passes_and_creates_logs(tmp_path, llamapro_inputs):
    submit_dir, save = tmp_path / "submit", tmp_path / "save"
    submit_dir.mkdir()
    env = _login_env(**_train_env(llamapro_inputs, save), REPO_DIR=str(REPO))
    r = _script(["--check", *CPU_JOB, "--", *TRAINER_ARGS], env, cwd=submit_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(r) == [rounding_warning(llamapro_inputs), check_ok(llamapro_inputs)]
    assert (submit_dir / "logs").is_dir()            # from #SBATCH --output=logs/%x-%j.out
    assert not save.exists()                         # a check writes nothing else


# --------------------------------------------------------------------------- the cluster itself
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_cluster_has_two_idle_nodes(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], check=True).stdout
    nodes = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()}
    assert set(nodes) == {"n1", "n2"}, out
    assert all(state == "idle" for state, _ in nodes.values()), out
    assert "UP" in slurm_cluster.run(["scontrol", "ping"], check=True).stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_cluster_stop_ends_exactly_its_daemons(tmp_path, slurm_cluster):
    """A second cluster beside the first (own ports, own dirs); stop() ends its daemons and only them."""
    other = SlurmCluster(tmp_path / "other", install=False)
    other.start()
    try:
        pids = [p.pid for p in other._procs.values()]
        assert other.run(["sinfo", "-h", "-o", "%D %T"], check=True).stdout.split() == ["2", "idle"]
    finally:
        other.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"daemon pid {pid} still there"
    # The module's cluster is untouched.
    assert slurm_cluster.run(["scontrol", "ping"], check=True).stdout.count("UP")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_trivial_job_runs_on_both_nodes(tmp_path, slurm_cluster):
    script = tmp_path / "trivial.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --time=2\n"
        'echo "MASTER $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
        "srun bash -c 'echo \"TASK $SLURM_PROCID $SLURMD_NODENAME $(hostname)\"'\n")
    out = tmp_path / "trivial.out"
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(script, sbatch_args=[f"--output={out}"])
    state = slurm_cluster.wait(job, timeout=60)
    text = _read(out)
    assert state == "COMPLETED", text
    assert time.monotonic() - t0 < 30
    tasks = sorted(tuple(line.split()[1:]) for line in text.splitlines() if line.startswith("TASK "))
    assert [t[:2] for t in tasks] == [("0", "n1"), ("1", "n2")], text
    assert "MASTER n1" in text
    if slurm_cluster._use_unshare:        # emulated nodes have their own hostnames
        assert [t[2] for t in tasks] == ["n1", "n2"], text


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,expected", [
    (dict(TP="4", PP="1", GBS="8", MBS="1"),
     "preflight: error: allocation of 2 tasks (nodes x tasks-per-node) is not a multiple of TP x PP = 4 x 1"),
    (dict(TP="1", PP="1", GBS="3", MBS="1"),
     "preflight: error: global batch size 3 is not a multiple of DP x MBS = 2 x 1"),
], ids=["tp", "gbs"])
def test_slurm_mismatched_allocation_fails_fast(tmp_path, slurm_cluster, overrides, expected):
    out = tmp_path / "job.out"
    env = dict(overrides, LOAD=str(tmp_path / "no-ckpt"), DATA_PATH=f"1.0 {tmp_path / 'no-data'}",
               SAVE=str(tmp_path / "save"), PYTHON=PY)
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(PRETRAIN_SH, env=env, sbatch_args=[*CPU_JOB, f"--output={out}"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=60, poll=0.2)
    elapsed = time.monotonic() - t0
    text = _read(out)
    assert state == "FAILED", text
    assert slurm_cluster.job_info(job).get("ExitCode") == "2:0"
    assert expected in text
    assert "trainer:" not in text and "[rank" not in text
    assert _steps_launched(slurm_cluster, job) == []          # no srun step: no python training
    assert elapsed < 30, f"took {elapsed:.1f}s"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fake_scontrol,expected", [
    ("echo 'scontrol: error: Unable to contact slurm controller' >&2; exit 1",
     "pretrain_expand.sh: error: MASTER_ADDR: 'scontrol show hostnames n[1-2]' failed (exit 1): scontrol: error: "
     "Unable to contact slurm controller; set MASTER_ADDR to the job's first host"),
    ("exit 0",
     "pretrain_expand.sh: error: MASTER_ADDR is empty: 'scontrol show hostnames n[1-2]' printed no host; "
     "set MASTER_ADDR to the job's first host"),
], ids=["scontrol-fails", "scontrol-prints-nothing"])
def test_slurm_job_without_master_addr_fails_with_one_line(tmp_path, slurm_cluster, fake_scontrol, expected):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\n{fake_scontrol}\n")
    (fake_bin / "scontrol").chmod(0o755)
    out = tmp_path / "job.out"
    env = dict(LOAD="ckpt", DATA_PATH="data/x", PYTHON=PY, PATH=f"{fake_bin}:{os.environ['PATH']}")
    job = slurm_cluster.sbatch(PRETRAIN_SH, env=env, sbatch_args=[*CPU_JOB, f"--output={out}"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=60, poll=0.2)
    text = _read(out)
    assert state == "FAILED", text
    assert slurm_cluster.job_info(job).get("ExitCode") == "2:0"
    assert text.strip().splitlines() == [expected]
    assert _steps_launched(slurm_cluster, job) == []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slurm_submit_checks_then_submits(tmp_path, slurm_cluster, llamapro_inputs):
    """`--submit`: a failing check submits nothing; a passing one prints the ok line, submits with the
    same sbatch options and trainer arguments, and the job writes its log into the logs/ it created."""
    submit_dir, save = tmp_path / "submit", tmp_path / "save"
    submit_dir.mkdir()

    def queued() -> set[str]:
        return set(slurm_cluster.run(["squeue", "-h", "-o", "%i"], check=True).stdout.split())

    before = queued()
    bad = _login_env(slurm_cluster.env, **_train_env(llamapro_inputs, save, PP="1", GBS="3"), REPO_DIR=str(REPO))
    r = _script(["--submit", *CPU_JOB, "--", *TRAINER_ARGS], bad, cwd=submit_dir)
    assert r.returncode == 2, r.stdout + r.stderr
    assert _lines(r) == ["preflight: error: global batch size 3 is not a multiple of DP x MBS = 2 x 1 = 2 "
                         "(DP = 2 tasks / (TP x PP = 1 x 1))"]
    assert queued() == before

    good = _login_env(slurm_cluster.env, **_train_env(llamapro_inputs, save, TRAIN_ITERS="2"), REPO_DIR=str(REPO))
    r = _script(["--submit", *CPU_JOB, "--", *TRAINER_ARGS], good, cwd=submit_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _lines(r)
    assert lines[:2] == [rounding_warning(llamapro_inputs), check_ok(llamapro_inputs)] and len(lines) == 3, lines
    match = re.fullmatch(r"Submitted batch job (\d+)", lines[2])
    assert match, lines
    job = int(match.group(1))
    state = slurm_cluster.wait(job, timeout=180)
    text = _read(submit_dir / "logs" / f"llamapro-{job}.out")
    assert state == "COMPLETED", text[-6000:]
    assert "--log-interval 1 --eval-iters 1" in text            # the trainer arguments went along
    assert _tracker(save) == "2"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_mpi_pmix_ranks(slurm_cluster):
    ensure_mpi4py(PY)
    code = ("from megatron_llamapro.runtime.distributed import detect_launch_env; e = detect_launch_env(); "
            "print('RANK', e.rank, e.world_size, e.local_rank, e.source, flush=True)")
    r = slurm_cluster.run(["srun", "--mpi=pmix", "-N2", "-n2", PY, "-c", code], cwd=REPO, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = sorted(tuple(line.split()[1:]) for line in r.stdout.splitlines() if line.startswith("RANK "))
    assert ranks == [("0", "2", "0", "mpi"), ("1", "2", "0", "mpi")], r.stdout + r.stderr


# --------------------------------------------------------------------------- end to end with the trainer
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slurm_pretrain_two_nodes_and_resume(tmp_path, slurm_cluster, llamapro_inputs):
    """2 nodes x 1 CPU task (gloo), PP=2: 6 iterations with checkpoints, then a second job to 8 resumes."""
    save = tmp_path / "save"
    out1, out2 = tmp_path / "run1.out", tmp_path / "run2.out"

    job = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=_train_env(llamapro_inputs, save),
                               sbatch_args=[*CPU_JOB, f"--output={out1}"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=180)
    text = _read(out1)
    assert state == "COMPLETED", text[-6000:]
    started = [line for line in text.splitlines() if line.startswith("started: ")]
    assert len(started) == 1 and re.fullmatch(r"started: \w+ launch, world 2, TP=1 PP=2 DP=1, "
                                              r"2 hosts: n1 \(rank 0\), n2 \(rank 1\)", started[0]), text[-6000:]
    assert len(_steps_launched(slurm_cluster, job)) == 2      # one training task on each node
    assert _tracker(save) == "6"
    first = training_iterations(save)
    assert sorted(first) == list(range(1, 7)), first

    job2 = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=_train_env(llamapro_inputs, save, TRAIN_ITERS="8"),
                                sbatch_args=[*CPU_JOB, f"--output={out2}"], cwd=REPO)
    state = slurm_cluster.wait(job2, timeout=180)
    text2 = _read(out2)
    assert state == "COMPLETED", text2[-6000:]
    assert _tracker(save) == "8"
    both = training_iterations(save)
    resumed = sorted((Counter(both) - Counter(first)).elements())
    assert resumed == [7, 8], both
    assert sorted(both) == list(range(1, 9)), both


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slurm_preemption_requeue(tmp_path, slurm_cluster, llamapro_inputs):
    """USR1 to the batch shell (as --signal=B:USR1@300 or a preemption does) -> the script forwards it,
    the trainer saves and exits 75, the script requeues; the requeued run resumes and completes with no
    iteration run twice or skipped."""
    save = tmp_path / "save"
    out = tmp_path / "job.out"
    iters = 60
    env = _train_env(llamapro_inputs, save, TRAIN_ITERS=str(iters), SAVE_INTERVAL="5", EVAL_INTERVAL="1000")
    job = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS, env=env, sbatch_args=[*CPU_JOB, f"--output={out}"],
                               cwd=REPO)
    deadline = time.monotonic() + 180
    while _tracker(save) is None:                     # wait for the first periodic checkpoint
        state = slurm_cluster.job_state(job)
        if state not in ("PENDING", "CONFIGURING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint before preemption (job {state}):\n{_read(out)[-6000:]}")
        time.sleep(0.1)
    slurm_cluster.cancel(job, signal_name="USR1", batch=True)      # scancel -b -s USR1 JOB

    state = slurm_cluster.wait(job, timeout=240)
    text = _read(out)
    info = slurm_cluster.job_info(job)
    assert state == "COMPLETED", text[-6000:]
    assert int(info.get("Restarts", "0")) == 1, info
    assert "received SIGUSR1: forwarding it to the training step" in text, text[-6000:]
    assert f"exit code {PREEMPTION_EXIT_CODE}" in text and "requeueing job" in text, text[-6000:]
    assert "(restart 1)" in text
    assert _tracker(save) == str(iters)
    done = training_iterations(save)
    # Saved at the preemption point: every iteration ran exactly once across the two runs.
    assert sorted(done) == list(range(1, iters + 1)), done


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_convert_and_expand_jobs(tmp_path, slurm_cluster, llamapro_inputs):
    """slurm/convert.sh then slurm/expand.sh as single-node CPU jobs (their 32-CPU default lowered)."""
    small = ["--cpus-per-task=1", "--time=10"]
    base, expanded = tmp_path / "base", tmp_path / "expanded"
    out1, out2 = tmp_path / "convert.out", tmp_path / "expand.out"
    job = slurm_cluster.sbatch(REPO / "slurm" / "convert.sh",
                               env=dict(HF_DIR=llamapro_inputs["HF_DIR"], OUT=str(base), TP="1", PP="2",
                                        FORMAT="torch", PYTHON=PY),
                               sbatch_args=[*small, f"--output={out1}"], cwd=REPO)
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", _read(out1)[-4000:]
    assert "tools/convert_hf_to_megatron.py --hf-dir" in _read(out1)
    assert _tracker(base) is not None
    job = slurm_cluster.sbatch(REPO / "slurm" / "expand.sh",
                               env=dict(IN=str(base), OUT=str(expanded), NUM_NEW_BLOCKS="2", PYTHON=PY),
                               sbatch_args=[*small, f"--output={out2}"], cwd=REPO)
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", _read(out2)[-4000:]
    text = _read(out2)
    assert "--num-new-blocks 2 --placement interleaved --workers 1" in text, text[-4000:]
    assert _tracker(expanded) is not None


# --------------------------------------------------------------------------- SFT=1: instruction tuning
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_sft_check_needs_train_iters_then_passes(tmp_path, llamapro_inputs):
    env = _train_env(llamapro_inputs, tmp_path / "save", SFT="1", DATA_PATH=llamapro_inputs["CHAT"], SEQ_LEN="128")
    del env["TRAIN_ITERS"]
    r = _script(["--check", *CPU_JOB], _login_env(**env, REPO_DIR=str(REPO)), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert _lines(r) == ["pretrain_expand.sh: error: TRAIN_ITERS is not set: with SFT=1 give the number of steps "
                         "(about samples x epochs / GBS; packing puts several samples in a sequence, and the "
                         "trainer's --check/start lines say how many sequences an epoch has)"]
    r = _script(["--check", *CPU_JOB], _login_env(**env, TRAIN_ITERS="4", REPO_DIR=str(REPO)), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(r)[-1].endswith("trains all parameters"), _lines(r)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_sft_job_two_nodes(tmp_path, slurm_cluster, llamapro_inputs):
    """SFT=1 on 2 nodes (PP=2) from the expanded checkpoint: every parameter trains on the chat set's
    assistant tokens, the text sets are evaluated beside the chat split, and the loss falls."""
    save, out = tmp_path / "sft", tmp_path / "sft.out"
    env = _train_env(llamapro_inputs, save, SFT="1", DATA_PATH=llamapro_inputs["CHAT"], SEQ_LEN="128",
                     GBS="4", TRAIN_ITERS="6", EVAL_INTERVAL="6", SAVE_INTERVAL="6")
    job = slurm_cluster.sbatch(PRETRAIN_SH, TRAINER_ARGS + ["--lr-decay-style", "constant"], env=env,
                               sbatch_args=[*CPU_JOB, f"--output={out}"], cwd=REPO)
    state = slurm_cluster.wait(job, timeout=200)
    text = _read(out)
    assert state == "COMPLETED", text[-6000:]
    assert "trainable: all parameters" in text and "chat set 'train': " in text, text[-6000:]
    assert _tracker(save) == "6"
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "valid_loss/chat" in r]
    assert [r["iteration"] for r in evals] == [0, 6] and all("valid_loss/general" in r for r in evals)
    assert evals[1]["valid_loss/chat"] < evals[0]["valid_loss/chat"]
