"""MAG's gate: the attention branch gates the memory's read, both normalised."""

import torch

from titans_pytorch import MemoryAsGateTransformer


def test_attention_gates_the_memory_read(float64):
    torch.manual_seed(0)
    model = MemoryAsGateTransformer(num_tokens=32, dim=16, depth=1, segment_len=4, num_persist_mem_tokens=2,
                                    heads=2, dim_head=8, neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8))
    mixer = model.layers[0][1]
    x = torch.randn(2, 11, 16)
    out, _ = mixer(x, 0)

    # the two branches, run on their own
    y, _ = mixer.attention(x, 0)
    read = mixer.memory(x)
    expected = mixer.to_out(torch.sigmoid(mixer.gate.attention_norm(y)) * mixer.gate.memory_norm(read))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    # the read enters linearly: doubling the memory norm's scale doubles the output
    with torch.no_grad():
        mixer.gate.memory_norm.weight.mul_(2)
    doubled, _ = mixer(x, 0)
    torch.testing.assert_close(doubled, 2 * out, rtol=0, atol=1e-12)
