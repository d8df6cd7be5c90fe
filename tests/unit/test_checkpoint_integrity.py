"""Checkpoint integrity: every file's size and sha256 recorded in the manifest at save time and
verified before use. A truncated shard, a flipped byte, a missing file and the manifest of
another checkpoint are each refused with the file named, for every kind of checkpoint the
project writes (parent, ranked, elastic with router/optimizer-free extras and RNG state,
exported)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_elastic.checkpoint import (
    MANIFEST,
    load_checkpoint,
    load_extra,
    load_rank_state,
    read_manifest,
    save_checkpoint,
)
from megatron_elastic.integrity import CheckpointDamaged

ROOT = Path(__file__).parents[2]
KINDS = ("parent", "ranked", "elastic", "exported")


def _build(kind: str, pgs, tiny_config, small_config, seed: int):
    """(model, config, save kwargs) as each producer writes that kind."""
    from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.router import ElasticRouter, RouterConfig, router_state
    from megatron_elastic.training.state import capture_rng

    torch.manual_seed(seed)
    if kind == "elastic":
        cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
        router = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=10))
        extra = {**router_state(router), "scheduler": {"last_epoch": seed}}
        model = build_elastic_model(cfg, elastic, pgs)
        return model, cfg, {"extra": extra, "rank_state": capture_rng()}
    if kind == "exported":  # a smaller standalone model, as export_budget writes it
        return build_hybrid_model(small_config, pgs), small_config, {"metadata": {"budget": "x"}}
    meta = {"layer_ranking": list(range(tiny_config.num_layers))} if kind == "ranked" else {}
    return build_hybrid_model(tiny_config, pgs), tiny_config, {"metadata": meta}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pgs, tiny_config, small_config):
    """Per kind: two checkpoints of the same architecture with different weights (the second
    lends its manifest to the "another checkpoint" case) and a model to load into."""
    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for kind in KINDS:
        for seed in (0, 1):
            model, cfg, kwargs = _build(kind, pgs, tiny_config, small_config, seed)
            save_checkpoint(root / f"{kind}{seed}", model, cfg, kind=kind, **kwargs)
        out[kind] = (root / f"{kind}0", root / f"{kind}1", model, cfg)
    return out


def _load_all(path: Path, model, cfg, kind: str) -> None:
    """Everything a consumer of this kind reads."""
    load_checkpoint(path, model, cfg, kinds=(kind,))
    if kind == "elastic":
        load_extra(path)
        assert load_rank_state(path) is not None


def _shard(path: Path) -> Path:
    return sorted((path / "weights").glob("*.distcp"))[0]


def test_manifest_records_every_file_with_its_sha256(checkpoints) -> None:
    for kind, (path, _, model, cfg) in checkpoints.items():
        manifest = read_manifest(path)
        files = manifest["files"]
        on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        assert sorted(files) == [f for f in on_disk if f != MANIFEST], kind
        for name, record in files.items():
            data = (path / name).read_bytes()
            assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["checksum"] == "sha256"
        _load_all(path, model, cfg, kind)  # intact: loads


def _truncate(path: Path, other: Path) -> str:
    shard = _shard(path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return f"weights/{shard.name}"


def _flip(path: Path, other: Path) -> str:
    shard = _shard(path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    return f"weights/{shard.name}"


def _remove(path: Path, other: Path) -> str:
    (path / "weights" / ".metadata").unlink()
    return "weights/.metadata"


def _foreign_manifest(path: Path, other: Path) -> str:
    ours, theirs = read_manifest(path)["files"], read_manifest(other)["files"]
    shutil.copy(other / MANIFEST, path / MANIFEST)
    differ = [n for n in theirs if n.startswith("weights/") and ours[n] != theirs[n]]
    assert f"weights/{_shard(path).name}" in differ  # other weights
    return min(differ)  # the first (in sorted order) whose bytes differ


DAMAGE = {
    "truncated shard": (_truncate, "truncated"),
    "flipped byte": (_flip, "checksum"),
    "missing file": (_remove, "is missing"),
    "manifest of another checkpoint": (_foreign_manifest, "checksum"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_invariant_damaged_checkpoint_is_refused_with_the_file_named(
    checkpoints, tmp_path, kind, damage
) -> None:
    source, other, model, cfg = checkpoints[kind]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    apply, says = DAMAGE[damage]
    name = apply(path, other)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointDamaged) as info:
        load_checkpoint(path, model, cfg, kinds=(kind,))
    message = str(info.value)
    assert info.value.file == name and name in message and says in message, message
    assert str(path) in message and "\n" not in message
    assert before == {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}  # untouched


@pytest.mark.parametrize("name", ["extra.pt", "ranks/rank0.pt"])
def test_invariant_damaged_router_and_rng_state_are_refused(checkpoints, tmp_path, name) -> None:
    source, _, _, _ = checkpoints["elastic"]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    file = path / name
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))
    loader = load_extra if name == "extra.pt" else load_rank_state
    with pytest.raises(CheckpointDamaged, match=f"{name} does not match its sha256"):
        loader(path)
    file.unlink()
    with pytest.raises(CheckpointDamaged, match=f"{name} is missing"):
        loader(path)


def test_invariant_unrecorded_file_in_weights_is_refused(checkpoints, tmp_path) -> None:
    source, _, model, cfg = checkpoints["parent"]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    (path / "weights" / "__1_0.distcp").write_bytes(b"stray")
    with pytest.raises(CheckpointDamaged, match=r"__1_0\.distcp is not recorded in the manifest"):
        load_checkpoint(path, model, cfg)


def test_version_1_checkpoint_without_checksums_still_loads(checkpoints, tmp_path) -> None:
    """Checkpoints written before checksums existed load as before (unverified)."""
    source, _, model, cfg = checkpoints["parent"]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    manifest = json.loads((path / MANIFEST).read_text())
    for key in ("files", "checksum"):
        del manifest[key]
    manifest["format_version"] = 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    load_checkpoint(path, model, cfg)
    manifest["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99; this megatron-elastic reads"):
        load_checkpoint(path, model, cfg)


# --- checkpoint.verify: manifest (presence and sizes, no checksums) ------------------------------


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}


def test_verify_manifest_skips_checksums_but_not_presence_or_size(checkpoints, tmp_path) -> None:
    """``verify="manifest"`` loads a shard with a flipped byte (the documented trade-off: the
    flip reaches the weights unnoticed) that ``full`` refuses; a truncated, missing or stray
    file is refused by both, with the same one-line error."""
    source, other, model, cfg = checkpoints["parent"]
    load_checkpoint(source, model, cfg)
    intact = _state(model)
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    name = _flip(path, other)
    with pytest.raises(CheckpointDamaged, match=f"{name} does not match its sha256"):
        load_checkpoint(path, model, cfg, verify="full")
    load_checkpoint(path, model, cfg, verify="manifest")
    changed = [k for k, v in _state(model).items() if not torch.equal(v, intact[k])]
    assert len(changed) == 1, changed  # one weight tensor carries the flipped bit
    for damage in (_truncate, _remove):
        shutil.rmtree(path)
        shutil.copytree(source, path)
        name = damage(path, other)
        errors = []
        for verify in ("full", "manifest"):
            with pytest.raises(CheckpointDamaged) as info:
                load_checkpoint(path, model, cfg, verify=verify)
            errors.append(str(info.value))
        assert errors[0] == errors[1] and name in errors[0] and "\n" not in errors[0]
    shutil.rmtree(path)
    shutil.copytree(source, path)
    (path / "weights" / "__1_0.distcp").write_bytes(b"stray")
    with pytest.raises(CheckpointDamaged, match=r"__1_0\.distcp is not recorded"):
        load_checkpoint(path, model, cfg, verify="manifest")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["weights/.metadata"]["bytes"] = "12"  # the structure is checked too
    (path / MANIFEST).write_text(json.dumps(manifest))
    for verify in ("full", "manifest"):
        with pytest.raises(CheckpointDamaged, match=r"malformed file-table entry for 'weights/\.m"):
            load_checkpoint(path, model, cfg, verify=verify)


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, list | tuple):
        return [t for item in state for t in _tensors(item)]
    return []


def _flip_tensor_byte(file: Path) -> None:
    """Flip one bit inside the bytes of the first tensor (>= 64 bytes) that ``file`` holds."""
    big = [t for t in _tensors(torch.load(file, weights_only=False)) if t.nbytes >= 64]
    raw = big[0].contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray(file.read_bytes())
    where = bytes(data).find(raw[:64])
    assert where >= 0
    data[where + 8] ^= 0x01
    file.write_bytes(bytes(data))


def test_verify_manifest_for_router_and_rng_state(checkpoints, tmp_path) -> None:
    """Router/optimizer extras and RNG state: ``manifest`` loads a flipped bit in tensor data
    (torch.load does not notice it either), ``full`` refuses it; both refuse a wrong size."""
    source, _, _, _ = checkpoints["elastic"]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    for name, loader in (("extra.pt", load_extra), ("ranks/rank0.pt", load_rank_state)):
        intact = _tensors(loader(path, verify="full"))
        file = path / name
        _flip_tensor_byte(file)
        with pytest.raises(CheckpointDamaged, match=f"{name} does not match its sha256"):
            loader(path, verify="full")
        flipped = _tensors(loader(path, verify="manifest"))
        assert sum(not torch.equal(a, b) for a, b in zip(intact, flipped, strict=True)) == 1
        file.write_bytes(file.read_bytes()[:-1])
        with pytest.raises(CheckpointDamaged, match=f"{name} has .* bytes where the manifest"):
            loader(path, verify="manifest")
        file.unlink()
        with pytest.raises(CheckpointDamaged, match=f"{name} is missing"):
            loader(path, verify="manifest")


def test_verify_mode_errors(checkpoints) -> None:
    from megatron_elastic.training.recipe import CheckpointConfig

    with pytest.raises(ValueError, match=r"checkpoint.verify='sha'; choose one of \('full', 'm"):
        CheckpointConfig(save="s", verify="sha")
    assert CheckpointConfig(save="s").verify == "full"
    source, _, model, cfg = checkpoints["parent"]
    with pytest.raises(ValueError, match=r"verify='none'; choose one of"):
        load_checkpoint(source, model, cfg, verify="none")
    with pytest.raises(ValueError, match=r"verify='fast'; choose one of"):
        load_extra(checkpoints["elastic"][0], verify="fast")


@pytest.mark.parametrize("verify", ["full", "manifest"])
def test_trainer_loads_init_and_teacher_with_checkpoint_verify(
    checkpoints, tmp_path, pgs, verify
) -> None:
    """The trainer's init and teacher loads (the library functions it calls,
    :mod:`megatron_elastic.training.checkpointing`) verify as ``checkpoint.verify`` says: a
    flipped byte is refused by ``full``, loaded by ``manifest``."""
    from types import SimpleNamespace

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.training.checkpointing import StageState, load_stage, load_teacher

    source, other, model, cfg = checkpoints["parent"]
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    _flip(path, other)
    recipe = SimpleNamespace(
        model=cfg,
        parallel=ParallelConfig(),
        checkpoint=SimpleNamespace(verify=verify),
    )
    state = StageState(model, SimpleNamespace(reload_model_params=lambda: None), None)
    loads = (
        lambda: load_stage(recipe, {"resume": None, "init": path}, state, None),
        lambda: load_teacher(recipe, path, pgs, torch.float32),
    )
    for load in loads:
        if verify == "full":
            with pytest.raises(CheckpointDamaged, match="does not match its sha256"):
                load()
        else:
            load()
