"""The cross-attention transformer against diffusers' BasicTransformerBlock and Transformer2DModel on the same
weights, and the class-label context encoder that feeds it."""
import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.models.context_encoder import ClassEmbedder
from ms_ddpm.models.ddpm_unet import load_diffusers_weights
from ms_ddpm.models.transformer import BasicTransformerBlock, SpatialTransformer
from tests.helpers import assert_matches_reference as assert_matches
from tests.helpers import execution_mode, import_torch_reference, numpy_state_dict, randomise_norms_and_biases

DIM, HEADS, HEAD_DIM, CONTEXT_DIM = 16, 2, 8, 12
MODES = pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(tokens=rng.standard_normal((2, 10, DIM)).astype(np.float32),
                feature_map=rng.standard_normal((2, 8, 4, 3)).astype(np.float32),  # not square: H and W kept apart
                context=rng.standard_normal((2, 3, CONTEXT_DIM)).astype(np.float32))


@pytest.fixture(scope="module")
def block_pair(inputs):
    """diffusers' BasicTransformerBlock, its output, and a BasicTransformerBlock with its weights."""
    torch, _ = import_torch_reference()
    from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock

    torch.manual_seed(0)
    reference = randomise_norms_and_biases(torch, DiffusersBlock(DIM, HEADS, HEAD_DIM, cross_attention_dim=CONTEXT_DIM))
    with torch.no_grad():
        out = reference(torch.from_numpy(inputs["tokens"]),
                        encoder_hidden_states=torch.from_numpy(inputs["context"])).numpy()
    block = BasicTransformerBlock(DIM, HEADS, HEAD_DIM, CONTEXT_DIM)
    load_diffusers_weights(block, numpy_state_dict(reference))
    block.set_train(False)
    return block, out


@pytest.fixture(scope="module", params=[False, True], ids=["conv-projection", "linear-projection"])
def spatial_pair(request, inputs):
    """diffusers' Transformer2DModel (8 channels, blocks at 16, two blocks), its output, and a SpatialTransformer."""
    torch, diffusers = import_torch_reference()
    torch.manual_seed(1)
    reference = randomise_norms_and_biases(torch, diffusers.Transformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=8, num_layers=2, norm_num_groups=4,
        cross_attention_dim=CONTEXT_DIM, use_linear_projection=request.param))
    with torch.no_grad():
        out = reference(torch.from_numpy(inputs["feature_map"]),
                        encoder_hidden_states=torch.from_numpy(inputs["context"])).sample.numpy()
    net = SpatialTransformer(8, HEADS, HEAD_DIM, CONTEXT_DIM, depth=2, num_groups=4,
                             use_linear_projection=request.param)
    load_diffusers_weights(net, numpy_state_dict(reference))
    net.set_train(False)
    return net, out


@MODES
def test_block_matches_diffusers(block_pair, inputs, mode):
    block, expected = block_pair
    with execution_mode(mode):
        out = block(ms.Tensor(inputs["tokens"]), ms.Tensor(inputs["context"])).asnumpy()
    assert out.shape == (2, 10, DIM)
    assert_matches(out, expected)


@MODES
def test_spatial_transformer_matches_transformer2d(spatial_pair, inputs, mode):
    net, expected = spatial_pair
    with execution_mode(mode):
        out = net(ms.Tensor(inputs["feature_map"]), ms.Tensor(inputs["context"])).asnumpy()
    assert out.shape == (2, 8, 4, 3)
    assert_matches(out, expected)


def test_new_spatial_transformer_is_identity(inputs):
    """proj_out starts at zero (LDM's zero_module), so a U-Net level that gains the block keeps its behaviour."""
    net = SpatialTransformer(8, HEADS, HEAD_DIM, CONTEXT_DIM, num_groups=4)
    x = ms.Tensor(inputs["feature_map"])
    np.testing.assert_array_equal(net(x, ms.Tensor(inputs["context"])).asnumpy(), inputs["feature_map"])


def test_class_embedder_rows_and_null_label():
    embedder = ClassEmbedder(num_classes=10, context_dim=CONTEXT_DIM, num_tokens=2)
    assert embedder.null_label == 10 and embedder.embedding.embedding_table.shape == (11, 2 * CONTEXT_DIM)
    labels = np.array([3, 10, 3], np.int32)
    tokens = embedder(ms.Tensor(labels)).asnumpy()
    assert tokens.shape == (3, 2, CONTEXT_DIM)
    table = embedder.embedding.embedding_table.asnumpy()
    np.testing.assert_array_equal(tokens.reshape(3, -1), table[labels])  # token j = columns j*D ... (j+1)*D - 1
    assert 0.7 < table.std() < 1.3  # torch.nn.Embedding's N(0, 1), not MindSpore's N(0, 0.01)


@pytest.mark.parametrize("kwargs", [dict(num_classes=0, context_dim=4), dict(num_classes=10, context_dim=4,
                                                                              num_tokens=0)])
def test_class_embedder_refuses_empty_sizes(kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        ClassEmbedder(**kwargs)


class LabelConditioned(ms.nn.Cell):
    """labels -> ClassEmbedder tokens -> SpatialTransformer cross-attention: the path a class-conditional U-Net
    level takes. Returns the squared output, a stand-in loss."""

    def __init__(self):
        super().__init__()
        self.context_encoder = ClassEmbedder(num_classes=4, context_dim=CONTEXT_DIM, num_tokens=2)
        self.transformer = SpatialTransformer(8, HEADS, HEAD_DIM, CONTEXT_DIM, num_groups=4)

    def construct(self, x, labels):
        return (self.transformer(x, self.context_encoder(labels)) ** 2).mean()


def test_label_gradients_reach_the_embedding_in_both_modes(inputs):
    """Gradients flow from the loss through cross-attention into the rows of the labels used, and only those;
    GRAPH_MODE (a jitted step) and PYNATIVE_MODE give the same gradients."""
    net = LabelConditioned()
    proj_out = net.transformer.proj_out
    proj_out.weight.set_data(ms.Tensor(np.full(proj_out.weight.shape, 0.1, np.float32)))  # past the zero start
    grad_fn = ms.value_and_grad(net, None, net.trainable_params())
    x, labels = ms.Tensor(inputs["feature_map"]), ms.Tensor(np.array([1, 4], np.int32))  # class 1 and the null label

    @ms.jit
    def graph_step(x, labels):
        return grad_fn(x, labels)

    with execution_mode(ms.GRAPH_MODE):
        _, graph_grads = graph_step(x, labels)
    with execution_mode(ms.PYNATIVE_MODE):
        _, pynative_grads = grad_fn(x, labels)
    names = [p.name for p in net.trainable_params()]
    table_grad = graph_grads[names.index("context_encoder.embedding.embedding_table")].asnumpy()
    assert np.abs(table_grad[[1, 4]]).max(axis=1).min() > 0 and np.all(table_grad[[0, 2, 3]] == 0)
    for name, g, p in zip(names, graph_grads, pynative_grads):
        np.testing.assert_allclose(g.asnumpy(), p.asnumpy(), rtol=1e-5, atol=1e-7, err_msg=name)
