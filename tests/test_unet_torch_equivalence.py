"""ms_ddpm's U-Net against the PyTorch port of the annotated-diffusion U-Net (tests.torch_unet):
the same random weights give the same outputs (graph and PyNative mode) and the same loss gradients."""
import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.models.unet import Unet
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import import_torch_reference

torch, _ = import_torch_reference()
from tests.torch_unet import Unet as TorchUnet  # noqa: E402  (needs torch, imported above or skipped)
from tests.torch_unet import diffusion_loss, mindspore_names, mindspore_state_from_torch  # noqa: E402

CONFIGS = [
    # (constructor arguments, input shape (B, C, H, W)); every input is non-square
    (dict(dim=8, dim_mults=(1, 2), channels=1, heads=2, dim_head=8), (2, 1, 8, 12)),
    (dict(dim=8, dim_mults=(1, 2), channels=3, block_type="convnext", heads=2, dim_head=4), (2, 3, 12, 8)),
    (dict(dim=6, dim_mults=(1, 2), channels=3, init_dim=4, out_dim=6, resnet_block_groups=2, heads=1, dim_head=4,
          attention_levels=(1,)), (1, 3, 4, 8)),
]


def random_torch_unet(kwargs, seed=0):
    """A PyTorch U-Net with PyTorch's initialisation, except GroupNorm's affine parameters, which default to
    1 and 0 and would hide a gamma / beta mix-up; they are drawn at random too."""
    torch.manual_seed(seed)
    model = TorchUnet(**kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def mindspore_copy(torch_model, kwargs):
    """A MindSpore Unet with the same constructor arguments carrying the PyTorch model's weights."""
    net = Unet(**kwargs)
    state = mindspore_state_from_torch(torch_model)
    names = {p.name for p in net.get_parameters()}
    assert names == set(state), f"names differ: {sorted(names ^ set(state))}"
    not_loaded, _ = ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()})
    assert not not_loaded
    net.set_train(False)
    return net


def inputs(shape, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, 1000, shape[0])


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=["resnet-1ch", "convnext-3ch",
                                                            "resnet-init_dim-out_dim-attention_levels"])
def test_same_weights_give_same_output(kwargs, shape, mode):
    ms.set_context(mode=mode)
    reference = random_torch_unet(kwargs)
    net = mindspore_copy(reference, kwargs)
    x, t = inputs(shape)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    out = net(ms.Tensor(x), ms.Tensor(t.astype(np.int32))).asnumpy()
    assert out.shape == expected.shape == (shape[0], kwargs.get("out_dim", shape[1])) + shape[2:]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_same_weights_give_same_loss_gradients(mode):
    """Gradients of the L2 (eps) diffusion loss w.r.t. every parameter agree with PyTorch's to 1e-4 relative."""
    ms.set_context(mode=mode)
    kwargs, shape = CONFIGS[0]
    reference = random_torch_unet(kwargs)
    net = mindspore_copy(reference, kwargs)
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 1000))
    x0, t = inputs(shape, seed=2)
    noise = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)

    sqrt_ab = torch.tensor(np.sqrt(diffusion.alphas_cumprod), dtype=torch.float32)
    sqrt_1m_ab = torch.tensor(np.sqrt(1.0 - diffusion.alphas_cumprod), dtype=torch.float32)
    expected_loss = diffusion_loss(reference, torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(noise),
                                   sqrt_ab, sqrt_1m_ab, objective="eps", loss_type="l2")
    expected_loss.backward()
    names = mindspore_names(reference)
    expected = {names[name]: p.grad.numpy() for name, p in reference.named_parameters()}

    loss_fn = DiffusionLoss(net, diffusion, loss_type="l2")
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(loss_fn, None, params)(
        ms.Tensor(x0), ms.Tensor(t.astype(np.int32)), ms.Tensor(noise))
    np.testing.assert_allclose(float(loss.asnumpy()), float(expected_loss.detach()), rtol=1e-5)
    assert {p.name for p in params} == set(expected)
    for p, g in zip(params, grads):
        ref = expected[p.name]
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=p.name)

