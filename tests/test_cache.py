"""fastgen.cache: the latent cache format, streamed per rank, resumable, and its bad inputs."""

from __future__ import annotations

import pytest
import torch

from fastgen.cache import CacheError, LatentCache, write_shard


def shards(folder, sizes=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    start = 0
    for i, n in enumerate(sizes):
        ids = torch.arange(start, start + n, dtype=torch.float32)
        write_shard(folder / f"part_{i}", {
            "latents": ids[:, None, None].expand(n, 2, 3).clone(),  # each sample's id
            "encoder_hidden_states": torch.randn(n, 4, 6, generator=g),
            "pooled_projections": ids[:, None].clone(),
            "negative_encoder_hidden_states": torch.full((1, 4, 6), -1.0),
        })  # fmt: skip
        start += n
    return folder


def ids(batch):
    return batch["latents"][:, 0, 0].long().tolist()


def test_batches_carry_every_key_aligned_and_negatives_broadcast(tmp_path):
    cache = LatentCache(shards(tmp_path), batch_size=4)
    assert cache.samples == 8 and cache.keys == sorted(cache.keys)
    batch = cache()
    assert set(batch) == {"latents", "encoder_hidden_states", "pooled_projections",
                          "negative_encoder_hidden_states"}  # fmt: skip
    assert batch["latents"].shape == (4, 2, 3)
    assert batch["pooled_projections"][:, 0].long().tolist() == ids(batch)  # rows stay aligned
    assert torch.equal(batch["negative_encoder_hidden_states"], torch.full((4, 4, 6), -1.0))


def test_an_epoch_is_a_permutation_split_between_ranks(tmp_path):
    folder = shards(tmp_path, sizes=(4, 6))
    world, seen = 2, []
    caches = [LatentCache(folder, batch_size=2, rank=r, world=world, seed=3) for r in range(world)]
    per_rank = caches[0].batches_per_epoch
    assert per_rank == 2
    epoch = [ids(c()) for _ in range(per_rank) for c in caches]
    seen = sorted(i for b in epoch for i in b)
    assert len(seen) == len(set(seen)) == 8  # disjoint; 2 of 10 left for later epochs
    assert set(seen) <= set(range(10))
    nxt = [ids(c()) for c in caches]  # the next epoch is another permutation
    assert caches[0].epoch == 1 and nxt != epoch[:2]
    in_order = LatentCache(folder, batch_size=5, shuffle=False)
    assert ids(in_order()) == [0, 1, 2, 3, 4] and ids(in_order()) == [5, 6, 7, 8, 9]


def test_the_position_resumes_exactly(tmp_path):
    folder = shards(tmp_path)
    a = LatentCache(folder, batch_size=3, seed=1)
    for _ in range(3):  # into the second epoch
        a()
    state = a.state_dict()
    expected = [ids(a()) for _ in range(4)]
    b = LatentCache(folder, batch_size=3, seed=1)
    b.load_state_dict(state)
    assert [ids(b()) for _ in range(4)] == expected
    other = LatentCache(shards(tmp_path / "other", sizes=(2,)), batch_size=1)
    with pytest.raises(CacheError, match="8 samples"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: d / "missing", "no cache folder"),
        (lambda d: d, "holds no"),
        (lambda d: (d / "x.safetensors").write_bytes(b"not a tensor file") and d, "not a readable"),
    ],
)
def test_bad_folders(tmp_path, setup, match):
    with pytest.raises(CacheError, match=match):
        LatentCache(setup(tmp_path), batch_size=1)


def test_bad_shards_name_the_file_and_the_key(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder_hidden_states": torch.zeros(2, 3)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CacheError, match=r"a\.safetensors: no 'latents'"):
        LatentCache(tmp_path, batch_size=1)
    with pytest.raises(CacheError, match="'pooled' has batch 3, 'latents' has 2"):
        write_shard(tmp_path / "b", {"latents": torch.zeros(2, 1), "pooled": torch.zeros(3, 1)})
    with pytest.raises(CacheError, match="'negative_x' has batch 3"):
        write_shard(tmp_path / "b", {"latents": torch.zeros(2, 1), "negative_x": torch.zeros(3)})
    with pytest.raises(CacheError, match="0-d"):
        write_shard(tmp_path / "b", {"latents": torch.zeros(2, 1), "scale": torch.tensor(1.0)})


def test_shards_must_agree(tmp_path):
    write_shard(tmp_path / "a", {"latents": torch.zeros(2, 3), "c": torch.zeros(2, 4)})
    write_shard(tmp_path / "b", {"latents": torch.zeros(2, 3)})
    with pytest.raises(CacheError, match="keys"):
        LatentCache(tmp_path, batch_size=1)
    write_shard(tmp_path / "b", {"latents": torch.zeros(2, 5), "c": torch.zeros(2, 4)})
    with pytest.raises(CacheError, match=r"per-sample shape \(5,\)"):
        LatentCache(tmp_path, batch_size=1)


def test_fewer_samples_than_a_batch_per_rank(tmp_path):
    write_shard(tmp_path / "a", {"latents": torch.zeros(3, 1)})
    with pytest.raises(CacheError, match="fewer than one batch of 2 for each of 2 ranks"):
        LatentCache(tmp_path, batch_size=2, world=2)


def test_locate_names_the_shard_and_index_of_every_row(tmp_path):
    cache = LatentCache(shards(tmp_path), batch_size=3, seed=4)
    for _ in range(5):  # across an epoch's end
        state = cache.state_dict()
        for row, sample in enumerate(ids(cache())):
            path, index = cache.locate(state, row)
            assert (path.stem, index) == (
                ("part_0", sample) if sample < 3 else ("part_1", sample - 3)
            )


def test_verify_cache_checks_hashes_and_finiteness(tmp_path, capsys):
    from fastgen.cache import verify_cache
    from fastgen.cli import main

    folder = shards(tmp_path / "good")
    assert verify_cache(folder) == {"samples": 8, "shards": 2, "hashed": 8}
    assert main(["cache", "--verify", str(folder)]) == 0
    assert "8 samples in 2 shards: readable, finite, 8 tensors match" in capsys.readouterr().out

    damaged = shards(tmp_path / "damaged")
    data = bytearray((damaged / "part_1.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of the last tensor's last value
    (damaged / "part_1.safetensors").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"part_1.safetensors: '\w+' does not match its recorded"):
        verify_cache(damaged)

    nan = shards(tmp_path / "nan")
    write_shard(nan / "part_1", {"latents": torch.zeros(5, 2, 3),
                                 "encoder_hidden_states": torch.zeros(5, 4, 6).index_fill_(0, torch.tensor([2]), float("nan")),
                                 "pooled_projections": torch.zeros(5, 1),
                                 "negative_encoder_hidden_states": torch.zeros(1, 4, 6)})  # fmt: skip
    assert main(["cache", "--verify", str(nan)]) == 2
    err = capsys.readouterr().err
    assert err == (f"fastgen: error: {nan / 'part_1.safetensors'}: 'encoder_hidden_states' of "
                   "sample 2 holds NaN or inf\n")  # fmt: skip
