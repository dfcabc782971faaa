"""Resuming reads DeepSpeed checkpoints as data: every ZeRO stage and precision round-trips through
the safe loader with no pickle-executing read, and a planted pickle is refused, naming the file,
without running. Single-process DeepSpeed on gloo with a small module keeps these fast."""

from __future__ import annotations

import pickle
import re
import socket
from pathlib import Path

import deepspeed
import deepspeed.ops
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from tests.planted import Payload, planted_bytes
from workers.checkpoint import SAFE_GLOBALS, CheckpointError, load_checkpoint, load_data
from workers.train import full_state_dict

TAG = "checkpoint"
POSITION = {"epoch": 1, "step_in_epoch": 0, "global_step": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def distributed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
        }.items():
            env.setenv(key, value)
        # only DeepSpeed's inference uses this op, and its JIT build takes over a minute on CPU
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()


def new_engine(stage: int, precision: str, seed: int, offload: tuple[str, ...] = (), **extra):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, **{f"offload_{part}": {"device": "cpu"} for part in offload}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 8},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        **extra,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    return engine


def saved_engine(directory: Path, stage: int, precision: str, offload: tuple[str, ...] = ()):
    """An engine after two optimizer steps, checkpointed under ``directory/TAG``."""
    engine = new_engine(stage, precision, seed=0, offload=offload)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, 8, generator=generator).to(DTYPES[precision])
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"position": POSITION})
    return engine


def assert_same(a, b, where: str = "") -> None:
    """Equal tensors (bit for bit), containers and plain objects, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


# every stage and precision, and the CPU offloads the configs allow (deepspeed.offload_optimizer/params)
ALL = [(stage, precision, ()) for stage in range(4) for precision in DTYPES] + [
    (2, "fp32", ("optimizer",)),
    (3, "bf16", ("optimizer", "param")),
]


@pytest.mark.parametrize("stage, precision, offload", ALL)
def test_checkpoint_round_trips_through_the_safe_loader_and_every_read_is_weights_only(
    distributed, tmp_path, monkeypatch, stage, precision, offload
):
    saved = saved_engine(tmp_path, stage, precision, offload)
    fresh = new_engine(stage, precision, seed=1, offload=offload)
    with pytest.raises(AssertionError):
        assert_same(full_state_dict(fresh), full_state_dict(saved))
    reads = []
    torch_load = torch.load

    def spy(f, *args, **kwargs):
        reads.append((Path(f).name, kwargs.get("weights_only")))
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    client_state = load_checkpoint(fresh, str(tmp_path), TAG)
    monkeypatch.undo()
    assert client_state["position"] == POSITION
    assert {name for name, _ in reads} == {p.name for p in (tmp_path / TAG).glob("*.pt")}
    assert all(weights_only is True for _, weights_only in reads), reads
    assert_same(full_state_dict(fresh), full_state_dict(saved), "params")
    assert_same(fresh.optimizer.state_dict(), saved.optimizer.state_dict(), "optimizer")
    assert not set(SAFE_GLOBALS) & set(torch.serialization.get_safe_globals())  # scoped to each load


PLANTED = [
    (0, "fp32", "mp_rank_00_model_states.pt"),
    (0, "bf16", "mp_rank_00_model_states.pt"),
    (1, "fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (2, "bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (2, "fp16", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (3, "fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    (3, "bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
]


@pytest.mark.parametrize("stage, precision, name", PLANTED)
def test_a_planted_pickle_is_refused_naming_the_file_and_never_runs(distributed, tmp_path, stage, precision, name):
    saved_engine(tmp_path, stage, precision)
    target = tmp_path / TAG / name
    marker = tmp_path / "payload-ran"
    target.write_bytes(planted_bytes(target, marker))
    fresh = new_engine(stage, precision, seed=1)
    with pytest.raises(CheckpointError, match=re.escape(f"{target}: refused")) as err:
        load_checkpoint(fresh, str(tmp_path), TAG)
    assert "GLOBAL posix.system" in str(err.value)  # the reason names the function it refused
    assert not marker.exists()


def test_deepspeeds_own_loader_runs_the_planted_payload_that_the_safe_loader_refuses(tmp_path):
    """What the tests above guard against: the payload is live under DeepSpeed's stock engine."""
    path, marker = tmp_path / "model_states.pt", tmp_path / "payload-ran"
    torch.save({"module": {"weight": torch.ones(2)}}, path)
    path.write_bytes(planted_bytes(path, marker))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_data(str(path))
    assert not marker.exists()
    TorchCheckpointEngine().load(str(path))
    assert marker.exists()


def test_a_raw_pickle_and_a_truncated_file_are_errors_naming_the_file(tmp_path):
    raw, marker = tmp_path / "raw.pt", tmp_path / "payload-ran"
    raw.write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=2))  # the protocol torch writes
    with pytest.raises(CheckpointError, match=re.escape(f"{raw}: refused") + ".*posix.system"):
        load_data(str(raw))
    assert not marker.exists()
    truncated = tmp_path / "truncated.pt"
    torch.save({"module": {"weight": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=re.escape(f"{truncated}: not a readable checkpoint file")):
        load_data(str(truncated))


def test_a_directory_without_model_states_is_an_error_not_a_fresh_start(distributed, tmp_path):
    (tmp_path / TAG).mkdir()
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path))}: no DeepSpeed model states"):
        load_checkpoint(new_engine(0, "fp32", seed=0), str(tmp_path), TAG)


def test_a_universal_checkpoint_is_refused_because_deepspeed_reads_it_with_pickle(distributed, tmp_path):
    saved_engine(tmp_path, 2, "fp32")
    engine = new_engine(2, "fp32", seed=1, checkpoint={"load_universal": True})
    with pytest.raises(CheckpointError, match="universal checkpoints are not supported"):
        load_checkpoint(engine, str(tmp_path), TAG)
