"""The annotated-diffusion U-Net: shapes, graph/PyNative agreement, input checks, a tiny overfit, and cross-attention
conditioning (shapes, guidance, a tiny model that learns the class)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.guidance import ClassifierFreeGuidance
from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.models.normalization import GroupNorm
from ms_ddpm.models.unet import Softmax, Unet, WeightStandardization
from ms_ddpm.samplers import DDIMSampler
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import execution_mode

CONFIGS = [
    # (constructor arguments, input shape (B, C, H, W))
    (dict(dim=8, dim_mults=(1, 2), channels=1, heads=2, dim_head=8), (2, 1, 8, 8)),
    (dict(dim=8, dim_mults=(1, 2, 4), channels=3, heads=1, dim_head=8, dropout=0.1), (2, 3, 12, 16)),
    (dict(dim=8, dim_mults=(1, 2), channels=1, block_type="convnext", heads=2, dim_head=4), (1, 1, 10, 6)),
    (dict(dim=6, dim_mults=(1, 2), channels=3, init_dim=4, out_dim=6, resnet_block_groups=2, heads=1, dim_head=4,
          attention_levels=(1,)), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("kwargs,shape", CONFIGS)
def test_output_shape_and_graph_equals_pynative(kwargs, shape):
    net = Unet(**kwargs)
    net.set_train(False)  # dropout off, so the two modes see the same function
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
    t = ms.Tensor(rng.integers(0, 1000, shape[0]).astype(np.int32))
    pynative = net(x, t).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = net(x, t).asnumpy()
    out_channels = kwargs.get("out_dim", shape[1])
    assert pynative.shape == (shape[0], out_channels) + shape[2:]
    np.testing.assert_allclose(graph, pynative, rtol=1e-5, atol=1e-5)
    assert np.isfinite(pynative).all() and pynative.std() > 0


def test_parameter_names_are_prefixed_and_unique():
    names = [p.name for p in Unet(dim=8, dim_mults=(1, 2), channels=1, heads=1, dim_head=4).get_parameters()]
    assert len(names) == len(set(names))
    assert all(n.split(".")[0] in {"init_conv", "time_mlp", "downs", "mid_block1", "mid_attn", "mid_block2", "ups",
                                   "final_res_block", "final_conv"} for n in names)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_image_size_that_cannot_be_downsampled_is_refused(mode):
    ms.set_context(mode=mode)
    net = Unet(dim=8, dim_mults=(1, 2, 4), channels=1, heads=1, dim_head=4)
    x = ms.Tensor(np.zeros((1, 1, 10, 12), np.float32))
    with pytest.raises(ValueError, match="height and width must be multiples of 4"):
        net(x, ms.Tensor(np.zeros(1, np.int32)))


def test_bad_constructor_arguments_name_the_choices():
    with pytest.raises(ValueError, match=r"not divisible by 4 groups; choose the number of groups from \[1, 2, 3, 6\]"):
        Unet(dim=6, dim_mults=(1,), channels=1, resnet_block_groups=4)
    with pytest.raises(ValueError, match=r"block_type must be one of \['resnet', 'convnext'\]"):
        Unet(dim=8, block_type="transformer")
    with pytest.raises(ValueError, match=r"attention_levels must be distinct level indices in 0..1 .*got \[2\]"):
        Unet(dim=8, dim_mults=(1, 2), attention_levels=[2])
    with pytest.raises(ValueError, match=r"cross_attention_levels \[0\] must be among attention_levels \[1\]"):
        Unet(dim=8, dim_mults=(1, 2), num_classes=2, context_dim=8, attention_levels=[1], cross_attention_levels=[0])


def test_levels_outside_attention_levels_have_no_attention():
    names = {p.name.split(".attn.")[0] for p in Unet(dim=8, dim_mults=(1, 2, 2), channels=1, heads=1, dim_head=4,
                                                        attention_levels=[1, 2]).get_parameters() if ".attn." in p.name}
    assert names == {"downs.1", "downs.2", "ups.0", "ups.1"}  # level 0: downs.0 and (on the way up) ups.2


def test_tiny_unet_overfits_four_images():
    """Loss on a fixed set of (t, noise) draws falls below half its start within 100 Adam steps (measured: 0.27 of
    it, 0.37 after 25 steps). One level: the shapes of deeper U-Nets are tested above, and the compile is most of
    the test's time."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    images = np.stack([np.sin(xx * (k + 1) / 3.0) * np.cos(yy * (k + 2) / 4.0) for k in range(4)])
    x0 = ms.Tensor(images[:, None].astype(np.float32))
    net = Unet(dim=8, dim_mults=(1,), channels=1, heads=2, dim_head=8)
    n_params = sum(p.size for p in net.trainable_params())
    assert n_params < 20_000
    loss = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)), loss_type="l2")
    eval_t = ms.Tensor(rng.integers(0, 100, (8, 4)).astype(np.int32))
    eval_noise = ms.Tensor(rng.standard_normal((8, 4, 1, 8, 8), dtype=np.float32))

    def held_out_loss():
        return float(np.mean([loss(x0, eval_t[i], eval_noise[i]).asnumpy() for i in range(8)]))

    step = nn.TrainOneStepCell(loss, nn.Adam(net.trainable_params(), learning_rate=3e-3))
    start = held_out_loss()
    for _ in range(100):
        t = ms.Tensor(rng.integers(0, 100, 4).astype(np.int32))
        step(x0, t, ms.Tensor(rng.standard_normal((4, 1, 8, 8), dtype=np.float32)))
    end = held_out_loss()
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_group_norm_equals_nn_group_norm_in_value_and_gradient(mode):
    """GroupNorm (on CPU the fused kernel of ms_ddpm.kernels, tests/test_kernels.py): outputs and gradients (input
    and affine parameters, as training and the ODE likelihood's vector-Jacobian products need) equal
    `nn.GroupNorm`'s to float32 rounding, for 1 and several groups, in training and in inference."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    for groups, channels in [(4, 12), (1, 8)]:
        ours, ref = GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        ours.set_train(groups == 1)
        for name in ("gamma", "beta"):
            value = ms.Tensor(rng.standard_normal(channels).astype(np.float32))
            getattr(ours, name).set_data(value)
            getattr(ref, name).set_data(value)
        x = ms.Tensor(rng.standard_normal((3, channels, 6, 5)).astype(np.float32))

        def loss(net):
            def fn(x):
                return (net(x) ** 2).sum()
            return ms.grad(fn, grad_position=0, weights=net.trainable_params())

        np.testing.assert_allclose(ours(x).asnumpy(), ref(x).asnumpy(), rtol=1e-5, atol=1e-5)
        (dx, (dgamma, dbeta)), (rdx, (rdgamma, rdbeta)) = loss(ours)(x), loss(ref)(x)
        for a, b in [(dx, rdx), (dgamma, rdgamma), (dbeta, rdbeta)]:
            b = b.asnumpy()
            np.testing.assert_allclose(a.asnumpy(), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("by_matmul", [True, False], ids=["matmul row sums (CPU)", "reduced row sums (NPU, GPU)"])
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_attention_softmax_equals_the_kernel_in_value_and_gradient(mode, by_matmul):
    """The attention softmax's hand-written gradient (row sums as a matrix product on CPU, docs/performance.md; a
    reduction elsewhere, docs/ascend.md) equals automatic differentiation of `ops.softmax`, for float32 and float16
    inputs."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    ours = Softmax()
    assert ours.row_sums_by_matmul  # the tests run on CPU
    ours.row_sums_by_matmul = by_matmul
    for dtype, tol in [(ms.float32, 1e-6), (ms.float16, 2e-3)]:
        x = ms.Tensor(3 * rng.standard_normal((2, 3, 5, 7)), dtype)
        weights = ms.Tensor(rng.standard_normal((2, 3, 5, 7)), ms.float32)

        def loss(softmax):
            def fn(x):
                return (softmax(x).astype(ms.float32) * weights).sum()
            return ms.grad(fn)

        def reference(x):
            return ops.softmax(x.astype(ms.float32), axis=-1).astype(x.dtype)

        np.testing.assert_allclose(ours(x).asnumpy(), reference(x).asnumpy(), rtol=0, atol=tol)
        got, expected = loss(ours)(x), loss(reference)(x)
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got.asnumpy().astype(np.float32), expected.asnumpy().astype(np.float32),
                                   rtol=0, atol=tol)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_weight_standardization_equals_automatic_differentiation(mode):
    """Weight standardisation's hand-written gradient (docs/performance.md) equals automatic differentiation of
    (w - mean) / sqrt(var + eps) per output channel, for both eps the convolution uses."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    weight = ms.Tensor(rng.standard_normal((6, 4, 3, 3)), ms.float32)
    weights = ms.Tensor(rng.standard_normal((6, 4, 3, 3)), ms.float32)
    ours = WeightStandardization()
    for eps in (1e-5, 1e-3):
        def reference(w):
            mean = w.mean(axis=(1, 2, 3), keep_dims=True)
            var = ((w - mean) ** 2).mean(axis=(1, 2, 3), keep_dims=True)
            return (w - mean) / ops.sqrt(var + eps)

        def loss(standardize):
            def fn(w):
                return (standardize(w) * weights).sum()
            return ms.grad(fn)

        def standardize(w):
            return ours(w, eps)

        np.testing.assert_allclose(standardize(weight).asnumpy(), reference(weight).asnumpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(loss(standardize)(weight).asnumpy(), loss(reference)(weight).asnumpy(),
                                   rtol=0, atol=1e-5)


# --- cross-attention (latent diffusion's conditioning, Rombach et al. 2022, Sec. 3.3) -------------------------------
CROSS = dict(dim=8, dim_mults=(1, 2), channels=1, heads=1, dim_head=8, num_classes=2, context_dim=8,
             cross_attention_levels=(1,))


def randomise_zero_projections(net, seed=0):
    """A new SpatialTransformer is the identity (proj_out starts at zero); give its output projection weights, so
    that the context reaches the output."""
    rng = np.random.default_rng(seed)
    for p in net.trainable_params():
        if ".proj_out." in p.name:
            p.set_data(ms.Tensor(0.1 * rng.standard_normal(p.shape), ms.float32))


def test_cross_attention_unet_shapes_parameters_and_graph_equals_pynative():
    ms.set_seed(0)
    net = Unet(**CROSS)
    randomise_zero_projections(net)
    net.set_train(False)
    names = [p.name for p in net.trainable_params()]
    # the labels enter through the context tokens (N + 1 rows: the null label), not the time embedding
    assert net.num_class_embeds == 3 and net.class_embedding is None
    assert net.context_encoder.embedding.embedding_table.shape == (3, 8)
    assert any(n.startswith("downs.1.attn.transformer_blocks.0.attn2.to_k") for n in names)
    assert any(n.startswith("ups.0.attn.transformer_blocks.0.attn2") for n in names)  # level 1 on the way up
    assert any(n.startswith("mid_attn.transformer_blocks.0.attn2") for n in names)
    assert not any(n.startswith(("downs.0.attn.transformer", "ups.1.attn.transformer")) for n in names)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 1, 8, 8), dtype=np.float32))
    t = ms.Tensor(np.array([3, 50], np.int32))
    labels, swapped = ms.Tensor(np.array([0, 1], np.int32)), ms.Tensor(np.array([1, 0], np.int32))
    with execution_mode(ms.PYNATIVE_MODE):
        pynative, other = net(x, t, labels).asnumpy(), net(x, t, swapped).asnumpy()
    with execution_mode(ms.GRAPH_MODE):
        graph = net(x, t, labels).asnumpy()
    assert pynative.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(graph, pynative, rtol=1e-5, atol=1e-5)
    assert np.abs(other - pynative).max() > 1e-3  # the label reaches the output through cross-attention


def test_cross_attention_arguments_are_checked():
    with pytest.raises(ValueError, match="context_dim needs num_classes"):
        Unet(dim=8, dim_mults=(1, 2), channels=1, context_dim=8)
    with pytest.raises(ValueError, match=r"cross_attention_levels \[1\] need context_dim"):
        Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=2, cross_attention_levels=[1])
    with pytest.raises(ValueError, match=r"distinct level indices in 0..1"):
        Unet(**{**CROSS, "cross_attention_levels": [2]})
    net = Unet(**CROSS)
    with pytest.raises(ValueError, match="pass cond"):
        net(ms.Tensor(np.zeros((1, 1, 8, 8), np.float32)), ms.Tensor(np.zeros(1, np.int32)))


def test_guidance_through_cross_attention():
    """Classifier-free guidance (issue 13's `ClassifierFreeGuidance`, unchanged) on a cross-attention U-Net: one
    call on the doubled batch equals uncond + w (cond - uncond) from two calls, the null label a row of the
    context encoder."""
    ms.set_seed(1)
    net = Unet(**CROSS)
    randomise_zero_projections(net, seed=1)
    net.set_train(False)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal((2, 1, 8, 8), dtype=np.float32))
    t = ms.Tensor(np.array([10, 90], np.int32))
    labels, null = ms.Tensor(np.array([0, 1], np.int32)), ms.Tensor(np.array([2, 2], np.int32))
    guided = ClassifierFreeGuidance(net, null_label=2, guidance_scale=3.0)(x, t, labels).asnumpy()
    cond, uncond = net(x, t, labels).asnumpy(), net(x, t, null).asnumpy()
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 100 compiled steps and sampling: 62 s on 2 shared cores
def test_cross_attention_unet_learns_the_class():
    """Two classes of 8x8 images (bright top half / bright bottom half), the label only through cross-attention:
    after 100 Adam steps (graph mode, x0 objective, a schedule that ends in noise) the x0 loss at large t with the
    right labels is far below the loss with the labels swapped, and DDIM samples of each class are that class."""
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    top = np.where(np.arange(8)[:, None] < 4, 1.0, -1.0) * np.ones((8, 8))
    images = np.stack([top, -top])[:, None].astype(np.float32)
    net = Unet(**{**CROSS, "dim_mults": (1,), "cross_attention_levels": (0,)})
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 100, 1e-3, 0.2), objective="x0")  # alpha_bar_T 5e-5
    loss = DiffusionLoss(net, diffusion, loss_type="l2")
    step = nn.TrainOneStepCell(loss, nn.Adam(net.trainable_params(), learning_rate=3e-3))
    with execution_mode(ms.GRAPH_MODE):
        for _ in range(100):
            classes = rng.integers(0, 2, 16)
            labels = np.where(rng.uniform(size=16) < 0.2, 2, classes).astype(np.int32)  # 2: the null label
            step(ms.Tensor(images[classes]), ms.Tensor(rng.integers(0, 100, 16).astype(np.int32)),
                 ms.Tensor(rng.standard_normal((16, 1, 8, 8), dtype=np.float32)), ms.Tensor(labels))
    net.set_train(False)
    labels = np.arange(32, dtype=np.int32) % 2
    x0, t = ms.Tensor(images[labels]), ms.Tensor(rng.integers(80, 100, 32).astype(np.int32))
    noise = ms.Tensor(rng.standard_normal((32, 1, 8, 8), dtype=np.float32))
    right = float(loss(x0, t, noise, ms.Tensor(labels)).asnumpy())
    wrong = float(loss(x0, t, noise, ms.Tensor(1 - labels)).asnumpy())
    assert right < 0.25 * wrong, (right, wrong)
    sampler = DDIMSampler(diffusion)
    sampler.set_timesteps(10)
    with execution_mode(ms.PYNATIVE_MODE):  # 10 steps: cheaper op by op than compiling the sampling step
        samples = sampler.sample(net, (8, 1, 8, 8), seed=0, cond=ms.Tensor(labels[:8]), progress=False).asnumpy()
    top_minus_bottom = samples[:, 0, :4].mean(axis=(1, 2)) - samples[:, 0, 4:].mean(axis=(1, 2))
    np.testing.assert_array_equal(top_minus_bottom > 0, labels[:8] == 0)
