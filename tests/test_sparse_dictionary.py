"""The adapter inside attention: fused vs reference, sparsity, identity cases, per-sample routing."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from adapters import (
    MAX_COMPOSED,
    AdapterConfigError,
    AdapterHost,
    RoutingError,
    SampleRoute,
    SparseDictionaryAdapter,
    SparseDictionaryConfig,
    guided_routes,
)
from adapters.sparse_dictionary.kernels import fused_attention, linear_with_slack, reference_attention
from adapters.tiny import build_tiny_transformer

ATOMS = 16
ADDED = {"resolution": None, "aspect_ratio": None}


def tiny_transformer(heads: int = 4) -> PixArtTransformer2DModel:
    return build_tiny_transformer(num_attention_heads=heads)


@pytest.fixture()
def transformer() -> PixArtTransformer2DModel:
    return tiny_transformer()


def inputs(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 10, 32, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
    }


def forward(model: PixArtTransformer2DModel, batch_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch_inputs, added_cond_kwargs=ADDED).sample


def trained_like(transformer: PixArtTransformer2DModel, seed: int, **config: object) -> SparseDictionaryAdapter:
    """An adapter with random non-zero atoms, as if trained."""
    adapter = SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=ATOMS, **config), transformer, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.dictionary.copy_(torch.randn(layer.dictionary.shape, generator=generator) * 0.5)
    adapter.importance = {b: torch.rand(ATOMS, generator=generator) for b in adapter.blocks}
    return adapter


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "config",
    [
        {"activation": "topk", "density": 0.25},
        {"activation": "relu", "threshold": 0.3},
        {"activation": "soft_threshold", "threshold": 0.3},
    ],
    ids=lambda c: c["activation"],
)
def test_fused_path_equals_reference_path(transformer: PixArtTransformer2DModel, config: dict) -> None:
    host = AdapterHost(transformer)
    host.add("a", trained_like(transformer, seed=3, **config))
    batch = inputs(2)
    base = forward(transformer, batch)
    with host.route([SampleRoute("a")]):
        fused = forward(transformer, batch)
    host.reference = True
    with host.route([SampleRoute("a")]):
        reference = forward(transformer, batch)
    assert relative_error(fused, reference) < 1e-5
    assert relative_error(fused, base) > 1e-2, "the adapter must change the output for this test to mean anything"


def test_fused_attention_is_exact_with_and_without_query_slack() -> None:
    """The overlapping wide-query view (q written with slack) and the zero-padded copy (any
    other q) both equal the written-out attention map, with and without a mask."""
    generator = torch.Generator().manual_seed(0)
    batch, tokens, heads, head_dim, extra = 2, 12, 4, 8, 5
    projection = torch.nn.Linear(16, heads * head_dim)
    hidden = torch.randn(batch, tokens, 16, generator=generator)
    with torch.no_grad():
        slack_query = linear_with_slack(projection, hidden, extra).view(batch, tokens, heads, head_dim)
        plain_query = projection(hidden).view(batch, tokens, heads, head_dim)
    key, value = (torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(2))
    coefficients = torch.randn(batch, tokens, heads, extra, generator=generator)
    mask = torch.zeros(batch, 1, 1, tokens)
    mask[0, ..., -3:] = float("-inf")
    for attention_mask in (None, mask):
        expected = reference_attention(plain_query, key, value, coefficients, attention_mask, head_dim**-0.5)
        for query, has_slack in ((slack_query, True), (plain_query, False)):
            got = fused_attention(query, key, value, coefficients, attention_mask, head_dim**-0.5, has_slack)
            assert got.shape == (batch, tokens, heads, head_dim + extra)
            assert relative_error(got, expected) < 1e-6
    assert torch.equal(slack_query, plain_query)
    storage = slack_query.untyped_storage()
    slack = torch.empty(0, dtype=slack_query.dtype).set_(storage)[slack_query.numel() :]
    assert torch.equal(slack, torch.zeros(extra)), "the slack is read by the last head: it must be finite"


def test_attaching_and_untrained_adapter_leave_base_output_unchanged(transformer: PixArtTransformer2DModel) -> None:
    batch = inputs(2)
    base = forward(transformer, batch)
    host = AdapterHost(transformer)
    assert torch.equal(forward(transformer, batch), base)
    host.add("fresh", SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=ATOMS), transformer))
    with host.route([SampleRoute("fresh")]):
        assert relative_error(forward(transformer, batch), base) < 1e-6
    with host.route([SampleRoute(None)]):
        assert torch.equal(forward(transformer, batch), base)


def test_every_atom_masked_gives_frozen_output(transformer: PixArtTransformer2DModel) -> None:
    batch = inputs(2)
    base = forward(transformer, batch)
    host = AdapterHost(transformer)
    adapter = trained_like(transformer, seed=4)
    host.add("a", adapter)
    drop_all = {b: torch.zeros(ATOMS, dtype=torch.bool) for b in adapter.blocks}
    with host.route([SampleRoute("a", atom_mask=drop_all)]):
        assert torch.equal(forward(transformer, batch), base)


def active_atoms_per_token(host: AdapterHost, transformer: PixArtTransformer2DModel, route: SampleRoute) -> dict:
    seen: dict[int, torch.Tensor] = {}
    count = host.add_observer(lambda block, coefficients: seen.__setitem__(block, (coefficients != 0).sum(-1)))
    with count, host.route([route]):
        forward(transformer, inputs(2))
    assert host.observers == []
    return seen


def test_top_k_keeps_exactly_k_atoms_per_token_and_density_override_changes_k(
    transformer: PixArtTransformer2DModel,
) -> None:
    host = AdapterHost(transformer)
    host.add("a", trained_like(transformer, seed=5, density=0.25))
    counts = active_atoms_per_token(host, transformer, SampleRoute("a"))
    assert set(counts) == {0, 1}
    assert all(bool((c == 4).all()) for c in counts.values())  # round(0.25 * 16)
    counts = active_atoms_per_token(host, transformer, SampleRoute("a", density=0.5))
    assert all(bool((c == 8).all()) for c in counts.values())
    counts = active_atoms_per_token(host, transformer, SampleRoute("a", density=0.0625))
    assert all(bool((c == 1).all()) for c in counts.values())


def test_top_atoms_keeps_the_most_important(transformer: PixArtTransformer2DModel) -> None:
    host = AdapterHost(transformer)
    adapter = trained_like(transformer, seed=6, density=1.0)
    host.add("a", adapter)
    used: dict[int, torch.Tensor] = {}
    handle = host.add_observer(lambda block, c: used.__setitem__(block, (c != 0).any(dim=(0, 1))))
    with host.route([SampleRoute("a", top_atoms=3)]):
        forward(transformer, inputs(1))
    handle.remove()
    for block, atoms_used in used.items():
        expected = torch.zeros(ATOMS, dtype=torch.bool)
        expected[adapter.importance[block].topk(3).indices] = True
        assert torch.equal(atoms_used, expected)


def _attention_output(
    transformer: PixArtTransformer2DModel, host: AdapterHost, route: SampleRoute | None
) -> torch.Tensor:
    """Block 0's self-attention output for fixed hidden states, through ``route`` (None: the base)."""
    hidden = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    attention = transformer.transformer_blocks[0].attn1
    with torch.no_grad():
        if route is None:
            return attention(hidden)
        with host.route([route]):
            return attention(hidden)


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
def test_a_composed_update_is_the_sum_of_the_scaled_single_updates(reference: bool) -> None:
    transformer = tiny_transformer()
    host = AdapterHost(transformer, reference=reference)
    host.add("x", trained_like(transformer, seed=7, density=0.25))
    host.add("y", trained_like(transformer, seed=8, activation="relu", threshold=0.2))
    host.add("wide", trained_like_wide(transformer))
    half = torch.arange(ATOMS) < ATOMS // 2
    parts = [
        SampleRoute("x", density=0.5, scale=0.7),
        SampleRoute("y", atom_mask={0: half}, scale=-1.3),
        SampleRoute("wide", scale=2.0),
    ]
    base = _attention_output(transformer, host, None)
    composed = _attention_output(transformer, host, SampleRoute.compose(parts)) - base
    expected = sum(
        part.scale
        * (_attention_output(transformer, host, SampleRoute(part.adapter, part.density, part.atom_mask)) - base)
        for part in parts
    )
    assert relative_error(composed, expected) < 1e-5
    assert (
        relative_error(
            composed, expected - parts[2].scale * (_attention_output(transformer, host, SampleRoute("wide")) - base)
        )
        > 1e-2
    ), "every part must count"


def test_a_composed_adapter_at_scale_zero_is_absent(transformer: PixArtTransformer2DModel) -> None:
    host = AdapterHost(transformer)
    host.add("x", trained_like(transformer, seed=3))
    host.add("y", trained_like(transformer, seed=4))
    batch = inputs(2)
    with host.route([SampleRoute("x")]):
        alone = forward(transformer, batch)
    with host.route([SampleRoute.compose([SampleRoute("x"), SampleRoute("y", scale=0.0)])]):
        muted = forward(transformer, batch)
    with host.route([SampleRoute.compose([SampleRoute("y", scale=0.0), SampleRoute("x")])]):
        muted_first = forward(transformer, batch)
    assert torch.equal(muted, alone) and torch.equal(muted_first, alone)
    with host.route([SampleRoute.compose([SampleRoute("x"), SampleRoute("y", scale=1e-3)])]):
        assert not torch.equal(forward(transformer, batch), alone)


def trained_like_wide(transformer: PixArtTransformer2DModel) -> SparseDictionaryAdapter:
    """Twice the atoms of ``trained_like``'s, random non-zero ones."""
    adapter = SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=2 * ATOMS), transformer, seed=9)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.dictionary.copy_(torch.randn(layer.dictionary.shape, generator=torch.Generator().manual_seed(9)))
    return adapter


@pytest.mark.parametrize("grouped", [False, True], ids=["interleaved", "grouped"])
@pytest.mark.parametrize("with_wider_adapter", [True, False], ids=["two-widths", "one-width"])
def test_mixed_batch_equals_each_sample_alone(with_wider_adapter: bool, grouped: bool) -> None:
    """Row groups read and write their rows by index, or, when an adapter's rows are consecutive
    (``grouped``), as views; the output projection is the two products, or with one adapter
    width and ``fuse_output`` one fused product per row group (the adapter-less row included)."""
    transformer = tiny_transformer()
    host = AdapterHost(transformer, fuse_output=not with_wider_adapter)
    host.add("x", trained_like(transformer, seed=7, density=0.25))
    host.add("y", trained_like(transformer, seed=8, activation="relu", threshold=0.2))
    host.add("wide", SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=32), transformer))
    half = torch.arange(ATOMS) < ATOMS // 2
    routes = [
        SampleRoute("x"),
        SampleRoute("y"),
        SampleRoute(None),
        SampleRoute("x", density=0.5),
        SampleRoute("y", density=0.125),
        SampleRoute("x", atom_mask={0: half}, top_atoms=10),
        # Composed rows beside single ones: the same adapters at other channel offsets.
        SampleRoute.compose([SampleRoute("y", scale=-0.5), SampleRoute("x", density=0.5, scale=1.5)]),
        SampleRoute.compose([SampleRoute("x", scale=0.8), SampleRoute("y", atom_mask={1: half})]),
    ]
    if with_wider_adapter:
        routes.append(SampleRoute("wide"))
        routes.append(SampleRoute.compose([SampleRoute("wide", scale=0.5), SampleRoute("x")]))
    if grouped:
        routes.sort(key=lambda route: str(route.adapter))
    batch = inputs(len(routes))
    with host.route(routes):
        mixed = forward(transformer, batch)
    for row, route in enumerate(routes):
        alone_inputs = {name: value[row : row + 1] for name, value in batch.items()}
        with host.route([route]):
            alone = forward(transformer, alone_inputs)
        assert relative_error(mixed[row : row + 1], alone) < 1e-5, f"row {row} ({route})"


def test_fused_output_projection_equals_two_products_and_follows_changes_to_d(
    transformer: PixArtTransformer2DModel,
) -> None:
    fused_host = AdapterHost(transformer, fuse_output=True)
    adapter = trained_like(transformer, seed=12)
    fused_host.add("x", adapter)
    batch = inputs(2)

    def run(host: AdapterHost) -> torch.Tensor:
        with host.route([SampleRoute("x")]):
            return forward(transformer, batch)

    before = run(fused_host)
    # Private state, read only to show the fused matrices were built and so were what ran.
    assert len(fused_host._output_weights) == len(adapter.blocks)
    own = adapter.nbytes() + sum(t.numel() * t.element_size() for t in adapter.importance.values())
    assert fused_host.resident_bytes("x") > 2 * own  # the price of the fused matrices
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.dictionary.mul_(-1.5)  # in place, as an optimiser step changes D
    after = run(fused_host)
    fused_host.detach()
    plain_host = AdapterHost(transformer, fuse_output=False)
    plain_host.add("x", adapter)
    expected = run(plain_host)
    assert relative_error(after, expected) < 1e-5
    assert relative_error(after, before) > 1e-2
    assert not plain_host._output_weights
    assert plain_host.resident_bytes("x") == own
    plain_host.remove("x")


def test_a_resident_adapter_costs_its_weights_in_the_bases_dtype() -> None:
    transformer = tiny_transformer().to(torch.bfloat16)
    host = AdapterHost(transformer)
    adapter = trained_like(tiny_transformer(), seed=13)
    assert adapter.layer(0).dictionary.dtype == torch.float32  # type: ignore[union-attr]
    host.add("x", adapter)
    assert all(p.dtype == torch.bfloat16 for p in host.get("x").parameters())
    weights = sum(p.numel() for p in adapter.parameters()) * 2
    importance = sum(t.numel() * t.element_size() for t in adapter.importance.values())
    with host.route([SampleRoute("x")]):
        forward(transformer, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs(2).items()})
    assert host.resident_bytes("x") == weights + importance


def test_routes_tile_over_a_guidance_doubled_batch(transformer: PixArtTransformer2DModel) -> None:
    host = AdapterHost(transformer)
    host.add("x", trained_like(transformer, seed=9))
    batch = inputs(4)
    with host.route([SampleRoute("x"), SampleRoute(None)]):
        tiled = forward(transformer, batch)
    with host.route([SampleRoute("x"), SampleRoute(None), SampleRoute("x"), SampleRoute(None)]):
        explicit = forward(transformer, batch)
    assert torch.equal(tiled, explicit)


@pytest.mark.parametrize("branch", ["conditional", "unconditional", "both"])
def test_guided_routes_put_the_adapter_on_one_guidance_branch(
    transformer: PixArtTransformer2DModel, branch: str
) -> None:
    host = AdapterHost(transformer)
    host.add("x", trained_like(transformer, seed=11))
    batch = inputs(4)  # two samples: rows [unconditional 0, 1; conditional 0, 1]
    base = forward(transformer, batch)
    with host.route([SampleRoute("x")]):
        adapted = forward(transformer, batch)
    with host.route(guided_routes([SampleRoute("x"), SampleRoute("x")], branch)):  # type: ignore[arg-type]
        guided = forward(transformer, batch)
    acting = {"unconditional": [0, 1], "conditional": [2, 3], "both": [0, 1, 2, 3]}[branch]
    for row in range(4):
        expected = adapted if row in acting else base
        assert relative_error(guided[row], expected[row]) < 1e-5
    with pytest.raises(RoutingError, match="branch must be one of"):
        guided_routes([SampleRoute("x")], "positive")  # type: ignore[arg-type]


def test_switching_resident_adapters_copies_no_weights(transformer: PixArtTransformer2DModel) -> None:
    host = AdapterHost(transformer)
    adapter = trained_like(transformer, seed=10)
    host.add("x", adapter)
    pointers = [p.data_ptr() for p in host.get("x").parameters()]
    base_pointers = [p.data_ptr() for p in transformer.parameters()]
    for route in (SampleRoute("x"), SampleRoute(None), SampleRoute("x", density=0.5)):
        with host.route([route]):
            forward(transformer, inputs(1))
    assert [p.data_ptr() for p in host.get("x").parameters()] == pointers
    assert [p.data_ptr() for p in transformer.parameters()] == base_pointers


def test_bad_routes_and_configs_are_rejected_with_clear_messages(transformer: PixArtTransformer2DModel) -> None:
    host = AdapterHost(transformer)
    host.add("x", trained_like(transformer, seed=11))
    cases = [
        (SampleRoute("missing"), "not resident"),
        (SampleRoute("x", density=1.5), "density"),
        (SampleRoute("x", top_atoms=0), "top_atoms"),
        (SampleRoute("x", atom_mask={5: torch.ones(ATOMS, dtype=torch.bool)}), "block 5"),
        (SampleRoute("x", atom_mask={0: torch.ones(3, dtype=torch.bool)}), "shape"),
        (SampleRoute(None, density=0.5), "need an adapter"),
    ]
    host.add("y", trained_like(transformer, seed=12))
    five = [SampleRoute(name) for name in ("x", "y", "x", "y", "x")]
    cases += [
        (SampleRoute("x", scale=float("nan")), "finite"),
        (SampleRoute.compose([SampleRoute("x"), SampleRoute("x", scale=2.0)]), "each adapter once"),
        (SampleRoute.compose(five), f"at most {MAX_COMPOSED}"),
        (
            SampleRoute.compose([SampleRoute("x"), SampleRoute("y", composed=(SampleRoute("z"),))]),
            "name an adapter each",
        ),
        (SampleRoute.compose([SampleRoute("x"), SampleRoute(None)]), "name an adapter each"),
        (SampleRoute(None, composed=(SampleRoute("x"),)), "need an adapter"),
    ]
    for route, message in cases:
        with pytest.raises(RoutingError, match=message), host.route([route]):
            pass
    with pytest.raises(AdapterConfigError, match="multiple of"):
        SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=18), transformer)
    with pytest.raises(AdapterConfigError, match="density"):
        SparseDictionaryConfig(density=0).validate()
    other = SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=ATOMS), tiny_transformer(heads=2))
    with pytest.raises(RoutingError, match="made for base"):
        host.add("other", other)
