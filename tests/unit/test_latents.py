import torch

from fluxworks.flux_sampler.latents import make_img_ids, make_noise, pack, to_model_space, to_vae_space, unpack


def test_pack_round_trips_and_groups_2x2_patches():
    x = torch.randn(2, 16, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(unpack(tokens, 6, 8), x)
    assert torch.equal(tokens[0, 0].view(16, 2, 2), x[0, :, :2, :2])


def test_img_ids_are_row_and_column_indices():
    ids = make_img_ids(4, 6, torch.device("cpu"), torch.float32)
    assert ids.shape == (6, 3)
    assert ids[:, 0].eq(0).all()
    assert ids[4].tolist() == [0.0, 1.0, 1.0]


def test_noise_is_seeded_and_distinct_per_batch_item():
    a, b = make_noise((2, 16, 4, 4), 7), make_noise((2, 16, 4, 4), 7)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert torch.equal(a, torch.randn((2, 16, 4, 4), generator=torch.Generator().manual_seed(7)))


def test_latent_space_conversion_round_trips():
    x = torch.randn(1, 16, 2, 2)
    assert torch.allclose(to_vae_space(to_model_space(x)), x, atol=1e-6)
