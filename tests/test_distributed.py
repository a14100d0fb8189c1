"""Data-parallel IMP: 2 gloo ranks on the CPU, started by torchrun as a user would.

The ranks must hold identical masks, and (BN-free net, the same global sample order)
match one process at twice the batch: DDP averages the per-shard mean-loss gradients,
which is the global batch's mean-loss gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_ops import distributed, load_ticket

HERE = Path(__file__).resolve().parent
TIMEOUT = 240  # seconds per launch; each takes ~10 s on an idle 2-core machine


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 ranks on 2 cores: no oversubscription
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    root = tmp_path_factory.mktemp("ddp")
    done = _torchrun(
        [
            str(HERE / "ddp_worker.py"),
            "--out",
            str(root / "ddp"),
            "--batch-size",
            "16",
            "--rounds",
            "2",
        ],
        root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(root / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = ddp_worker.run(root / "single", batch_size=32, rounds=2, fail_rank=None)
    return ranks, single


@pytest.mark.parametrize("round_index", [0, 1, 2])
def test_ranks_hold_identical_masks_and_weights(ddp_and_single, round_index):
    (r0, r1), _ = ddp_and_single
    assert r0["world_size"] == r1["world_size"] == 2
    a, b = r0["rounds"][round_index], r1["rounds"][round_index]
    assert a["masks"].keys() == b["masks"].keys() == {"conv.weight"}
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=0, atol=0)
    assert a["accuracy"] == b["accuracy"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_with_other_masks_is_caught_on_every_rank(ddp_and_single, rank):
    record = ddp_and_single[0][rank]
    assert record["guard"].startswith("test masks differ between ranks (1 of 2 differ from rank 0)")


@pytest.mark.parametrize("round_index", [0, 1, 2])
def test_two_ranks_equal_one_process_at_twice_the_batch(ddp_and_single, round_index):
    (r0, _), single = ddp_and_single
    assert single["world_size"] == 1
    a, s = r0["rounds"][round_index], single["rounds"][round_index]
    expected_density = 0.5**round_index
    for name in s["masks"]:
        assert torch.equal(a["masks"][name], s["masks"][name]), name
        assert a["masks"][name].float().mean().item() == pytest.approx(expected_density)
    for name in s["weights"]:
        torch.testing.assert_close(a["weights"][name], s["weights"][name], rtol=1e-4, atol=1e-6)
    # training moved the weights (the comparison is not of two untouched inits)
    if round_index == 0:
        assert not torch.equal(
            a["weights"]["conv.weight"], r0["rounds"][1]["weights"]["conv.weight"]
        )


def test_torchrun_cli_prune_writes_once(tmp_path):
    out = tmp_path / "run"
    done = _torchrun(
        [
            "-m",
            "sparse_ops",
            "prune",
            "--arch",
            "res20s",
            "--data",
            "synthetic",
            "--image-size",
            "8",
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON object: only rank 0 printed
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    assert done.stderr.count("distributed: 2 ranks (gloo), batch 64 per rank, 128 per step") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "round0.safetensors",
        "round1.safetensors",
        "summary.json",
    ]
    ticket = load_ticket(out / "round1.safetensors")
    assert ticket.meta["world_size"] == 2
    assert ticket.density == pytest.approx(summary["final"]["density"])


def test_a_failed_rank_fails_the_job_and_is_named(tmp_path):
    done = _torchrun(
        [str(HERE / "ddp_worker.py"), "--out", str(tmp_path), "--fail-rank", "1"], tmp_path
    )
    assert done.returncode != 0
    assert "simulated failure of one rank" in done.stderr
    assert "rank      : 1 (local_rank: 1)" in done.stderr  # torchrun's root cause
    assert not (tmp_path / "rank0.pt").exists()  # rank 0 did not carry on alone


# ---------------------------------------------------------------- single-process helpers


@pytest.mark.parametrize(
    ("world", "rank", "n", "shard", "usable"),
    [(1, 0, 7, [0, 1, 2, 3, 4, 5, 6], 7), (2, 1, 7, [3, 4, 5], 6), (3, 0, 7, [0, 1], 6)],
)
def test_shards_and_usable_length(monkeypatch, world, rank, n, shard, usable):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    assert distributed.usable_length(n) == usable
    assert distributed.shard(torch.arange(usable)).tolist() == shard


def test_outside_torchrun_nothing_is_initialised(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    masks = {"a": torch.ones(2, 3, dtype=torch.bool)}
    assert distributed.broadcast_masks(masks, ["a"], like=masks) is masks
    distributed.check_identical(masks)  # a single process is trivially consistent


@pytest.mark.parametrize(("device", "fragment"), [("tpu", "device must be auto, cuda or cpu")])
def test_bad_device(device, fragment):
    with pytest.raises(distributed.DistributedError, match=fragment):
        distributed.init_from_env(device)
