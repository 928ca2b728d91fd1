"""golong.models under torch.distributed (gloo, CPU): FSDP2 meta-build + streaming load + save;
context parallelism through ring attention."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _fsdp_load_save(rank: int, world: int, src: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    import golong.models as gm
    from tests.golong.model_fixtures import packed_batch, rel

    mesh = init_device_mesh("cpu", (world,))
    cfg = gm.ModelConfig.from_hf(src)
    with torch.device("meta"):
        model = gm.Qwen3ForCausalLM(cfg, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gm.load_weights(model, src, device="cpu")  # to_empty + each rank reads only its rows

    ref = gm.from_pretrained(src, dtype=torch.float32)
    for (n, p), (n2, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert n == n2 and isinstance(p, DTensor), n
        # the local shard holds exactly this rank's rows (experts 4r..4r+3 for the 8-expert tensors)
        chunk = -(-q.shape[0] // world)
        assert torch.equal(p.to_local(), q[rank * chunk:(rank + 1) * chunk]), n
        assert torch.equal(p.full_tensor(), q), n

    ids, cu = packed_batch([7, 12], seed=rank)  # different data per rank
    with torch.no_grad():
        lp, ent = model(ids, cu, targets=ids.roll(-1))
        lp_ref, ent_ref = ref(ids, cu, targets=ids.roll(-1))
    assert rel(lp, lp_ref) <= 1e-5 and rel(ent, ent_ref) <= 1e-5

    model.save_pretrained(out, max_shard_bytes=300_000)  # all ranks gather, rank 0 writes
    if rank == 0:
        import json
        from pathlib import Path

        weight_map = json.loads((Path(out) / "model.safetensors.index.json").read_text())["weight_map"]
        got = {}
        for f in set(weight_map.values()):
            got.update(load_file(Path(out) / f))
        orig = load_file(Path(src) / "model.safetensors")
        assert got.keys() == orig.keys()
        for k in orig:
            assert torch.equal(got[k], orig[k]), k
    dist.barrier()


def _context_parallel(rank: int, world: int, src: str) -> None:
    import torch.distributed as dist

    import golong.models as gm
    import kernels
    from kernels.ring_attention import comm_stats
    from tests.golong.model_fixtures import packed_batch, rel

    model = gm.from_pretrained(src, dtype=torch.float32)
    ids, cu = packed_batch([9, 14, 3], seed=21)  # the same global batch on every rank
    targets = torch.randint(0, 1000, ids.shape, generator=torch.Generator().manual_seed(2))
    coef = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))

    # reference: cp = 1, the whole batch on this rank
    lp, ent = model(ids, cu, targets=targets)
    ((coef * lp).sum() + ent.sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.cp_group = dist.group.WORLD
    shard = lambda x: kernels.zigzag_shard(x, cu, rank, world)  # noqa: E731
    lp_l, ent_l = model(shard(ids), cu, targets=shard(targets))
    assert rel(lp_l, shard(lp.detach())) <= 1e-5 and rel(ent_l, shard(ent.detach())) <= 1e-5
    ((shard(coef) * lp_l).sum() + ent_l.sum()).backward()
    cp_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        assert rel(p.grad, ref_grads[n]) <= 1e-4, n
    # activation checkpointing: plain, the ring runs its forward passes again in backward; keeping the attention's
    # output, it does not, for the same gradients
    sent = {}
    for keep in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(True, keep_attention=keep)
        comm_stats.reset()
        lp_l, ent_l = model(shard(ids), cu, targets=shard(targets))
        ((shard(coef) * lp_l).sum() + ent_l.sum()).backward()
        sent[keep] = comm_stats.fwd_bytes
        for n, p in model.named_parameters():
            assert rel(p.grad, cp_grads[n]) <= 1e-6, (keep, n)
    model.set_activation_checkpointing(False)
    assert sent[True] > 0 and sent[False] == 2 * sent[True], sent


def _both(rank: int, world: int, src: str, out: str) -> None:
    _fsdp_load_save(rank, world, src, out)
    _context_parallel(rank, world, src)


def test_fsdp2_meta_load_save_and_context_parallel(tmp_path):
    """One pair of spawned ranks (startup dominates) runs both checks: FSDP2 streaming load/save, then
    context parallelism (ring attention on zigzag shards) vs cp = 1, forward and parameter gradients."""
    from tests.golong.model_fixtures import build_hf

    build_hf("moe").save_pretrained(tmp_path / "src")
    run_distributed(_both, 2, str(tmp_path / "src"), str(tmp_path / "out"))
